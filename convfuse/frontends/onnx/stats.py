"""Model statistics: shape inference over a model (:func:`infer_shapes`), op counts, parameters
and Conv MACs (:func:`model_stats`), and the before/after op summary of a report.
"""

from __future__ import annotations

import math
from collections import Counter

import onnx
from onnx import helper

from ...report import ModelStats, Report
from .index import _SMALL_CONSTANT, Shapes, _constant_value, _is_default
from .io import MAX_PROTOBUF, serialized_size, subgraphs
from .nodes import Dims, conv_macs

__all__ = ["REPORTED_OPS", "infer_shapes", "model_stats"]

#: Op types always shown in the before/after summary (others only when their count changes).
REPORTED_OPS = ("Conv", "BatchNormalization", "Add")
#: Listed in the before/after counts whenever the model has them (merged or not).
_SHOWN_WHEN_PRESENT = ("ConvTranspose",)


# --------------------------------------------------------------------------- shapes, stats
def _collect_shapes(graph: onnx.GraphProto, shapes: Shapes) -> None:
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims: Dims | None = None
        if tt.HasField("shape"):
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
        shapes[vi.name] = (int(tt.elem_type), dims)
    for node in graph.node:
        for sub in subgraphs(node):
            _collect_shapes(sub, shapes)


def _collect_initializers(graph: onnx.GraphProto, shapes: Shapes) -> None:
    for init in graph.initializer:
        shapes[init.name] = (int(init.data_type), tuple(int(d) for d in init.dims))
    for node in graph.node:
        for sub in subgraphs(node):
            _collect_initializers(sub, shapes)


def infer_shapes(model: onnx.ModelProto) -> tuple[Shapes, str | None]:
    """Element type and dims of every tensor ONNX shape inference can tell, and a note if it failed.

    Runs on a skeleton of the model whose large initializers are declared as inputs, so weights
    are never copied or serialised (models over 2 GiB included).
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    declared = {i.name for i in g.input}
    for init in model.graph.initializer:
        if math.prod(init.dims) <= _SMALL_CONSTANT:
            g.initializer.append(init)
        elif init.name not in declared:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    note = None
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False)
    except Exception as exc:  # inference is best effort: fall back to the model's own annotations
        inferred = skeleton
        note = f"shape inference failed ({' '.join(str(exc).split())[:200]}); using the model's own shapes"
    shapes: Shapes = {}
    _collect_shapes(inferred.graph, shapes)
    _collect_initializers(model.graph, shapes)
    return shapes, note


_PARAM_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


#: Ops whose multiply-accumulates the statistics count.
_MAC_OPS = ("Conv", "ConvTranspose")


def model_stats(model: onnx.ModelProto, shapes: Shapes | None = None) -> ModelStats:
    """Op counts (all graphs), floating-point parameters, and Conv / ConvTranspose MACs per sample
    (``None`` if any one's output, or a ConvTranspose's input, shape is unknown)."""
    if shapes is None:
        shapes = infer_shapes(model)[0]
    counts: Counter[str] = Counter()
    totals = {"params": 0, "macs": 0, "unknown": 0}

    def walk(graph: onnx.GraphProto, dims: dict[str, list[int]]) -> None:
        dims = dict(dims)
        for init in graph.initializer:
            dims[init.name] = [int(d) for d in init.dims]
            if init.data_type in _PARAM_TYPES:
                totals["params"] += math.prod(init.dims)
        for node in graph.node:
            counts[node.op_type if _is_default(node) else f"{node.domain}:{node.op_type}"] += 1
            if node.op_type == "Constant" and _is_default(node) and node.output:
                value = _constant_value(node)
                if value is not None:
                    dims[node.output[0]] = [int(d) for d in value.dims]
                    if value.data_type in _PARAM_TYPES:
                        totals["params"] += math.prod(value.dims)
            if node.op_type in _MAC_OPS and _is_default(node) and len(node.input) >= 2:
                w = dims.get(node.input[1])
                if w is None:
                    entry = shapes.get(node.input[1])
                    w = None if entry is None or entry[1] is None else [d or 0 for d in entry[1]]
                # A transposed conv does every tap once per *input* position (weight size times
                # input spatial), a conv once per output position.
                positions = shapes.get(node.input[0] if node.op_type == "ConvTranspose" else node.output[0])
                macs = None if w is None or positions is None else conv_macs(w, positions[1])
                if macs is None:
                    totals["unknown"] += 1
                else:
                    totals["macs"] += macs
            for sub in subgraphs(node):
                walk(sub, dims)

    walk(model.graph, {})
    macs = None if totals["unknown"] else totals["macs"]
    return ModelStats(dict(counts), totals["params"], macs, _size(model))


def _knows_conv_outputs(model: onnx.ModelProto, shapes: Shapes) -> bool:
    """Whether ``shapes`` has every Conv output of ``model`` (all graphs), all ``model_stats`` reads."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.op_type == "Conv" and node.output and node.output[0] not in shapes:
                return False
            graphs.extend(subgraphs(node))
    return True


def _size(model: onnx.ModelProto) -> int | None:
    """Bytes of the model serialised with its weights inline (None past protobuf's 2 GiB),
    counted without serialising it (:func:`~convfuse.frontends.onnx.io.serialized_size`)."""
    try:
        size = serialized_size(model)
    except Exception:  # protobuf refuses messages over 2 GiB
        return None
    return size if size <= MAX_PROTOBUF else None


def _summarise(report: Report) -> None:
    """Keep the ops a reader cares about: REPORTED_OPS and any op whose count changed."""
    before, after = report.before.op_counts, report.after.op_counts
    keep = set(REPORTED_OPS) | {
        op for op in set(before) | set(after) if before.get(op, 0) != after.get(op, 0)
    }
    keep |= {op for op in _SHOWN_WHEN_PRESENT if before.get(op, 0) or after.get(op, 0)}
    report.before.op_counts = {op: before.get(op, 0) for op in sorted(keep)}
    report.after.op_counts = {op: after.get(op, 0) for op in sorted(keep)}
