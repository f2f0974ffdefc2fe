"""The ONNX front end: read a graph into the planner's IR, write the plan back, the file I/O around it."""
