"""Front ends: find linear runs in torch modules and ONNX graphs, convert, write back."""
