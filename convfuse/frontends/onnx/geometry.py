"""The geometry of an ONNX graph as seen from one input: the list :mod:`convfuse.sizes` reads.

Plumbing only. The main graph is walked in order from the input; every node that reads a
tensor derived from it becomes a :class:`~convfuse.sizes.Geometry` (convolutions and pools by
their attributes, Pad and Resize by their constant inputs, shape-preserving ops as joins). A
node this walk does not describe (Transpose, Flatten, a Reshape to a computed shape, a
subgraph) ends the walk along its outputs: what lies beyond is left to the runtime to confirm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx
from onnx import numpy_helper

from ...sizes import Geometry
from .io import node_attributes as _attrs

__all__ = ["geometries", "input_channels"]

#: Ops whose output has the shape of their (broadcast) inputs: joins, as far as sizes go.
_SHAPE_KEEPING = frozenset(
    """Abs Acos Acosh Add And Asin Asinh Atan Atanh BatchNormalization BitShift BitwiseAnd BitwiseNot
    BitwiseOr BitwiseXor Cast CastLike Ceil Celu Clip Cos Cosh CumSum DequantizeLinear Div Dropout Elu
    Equal Erf Exp Floor Gelu Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Hardmax
    Identity InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax LpNormalization LRN Max Mean MeanVarianceNormalization Min Mish Mod Mul Neg Not Or PRelu
    Pow QuantizeLinear Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softmax Softplus Softsign
    Sqrt Sub Sum Swish Tan Tanh ThresholdedRelu Where Xor""".split()
)

_WINDOWS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})

Constants = Mapping[str, onnx.TensorProto]
Reader = Callable[[onnx.NodeProto, Constants, int, int], Geometry | None]


def _values(constants: Constants, name: str) -> np.ndarray | None:
    """A small constant's values (None when not a constant, or its data is not loaded)."""
    tensor = constants.get(name)
    if tensor is None:
        return None
    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # external data not loaded: the geometry does without it
        return None


def _per_dim(values: Sequence[int] | None, n: int, default: int) -> tuple[int, ...]:
    values = list(values) if values is not None else []
    return tuple(int(v) for v in values) if len(values) == n else (default,) * n


def _window(node: onnx.NodeProto, constants: Constants, n: int, position: int) -> Geometry | None:
    """Conv, ConvTranspose and the pools, by their attributes (kernel from the weight's dims)."""
    if position != 0:
        return None
    attrs = _attrs(node)
    kernel = attrs.get("kernel_shape")
    if kernel is None and len(node.input) > 1 and node.input[1] in constants:
        kernel = list(constants[node.input[1]].dims)[2:]
    if kernel is None or len(kernel) != n:
        return None
    flat = list(attrs.get("pads", [0] * 2 * n))
    if len(flat) != 2 * n:
        return None
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    transposed = node.op_type == "ConvTranspose"
    if transposed and "output_shape" in attrs:
        return None  # the output size is given, not computed: beyond this walk
    if auto_pad == "VALID":
        flat = [0] * 2 * n
    return Geometry(
        kernel=tuple(int(k) for k in kernel),
        stride=_per_dim(attrs.get("strides"), n, 1),
        dilation=_per_dim(attrs.get("dilations"), n, 1),
        pads=tuple((int(flat[i]), int(flat[i + n])) for i in range(n)),
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
        same=auto_pad in ("SAME_UPPER", "SAME_LOWER") and not transposed,
        transposed=transposed,
        output_padding=_per_dim(attrs.get("output_padding"), n, 0),
        name=_label(node),
    )


def _global_pool(node: onnx.NodeProto, constants: Constants, n: int, position: int) -> Geometry:
    return Geometry(output=(1,) * n, name=_label(node))


def _pad(node: onnx.NodeProto, constants: Constants, n: int, position: int) -> Geometry | None:
    """Constant pads (attribute before opset 11, input after), spatial dims only."""
    if position != 0:
        return None
    if len(node.input) > 1:
        if len(node.input) > 3 and node.input[3]:
            return None  # axes: rare; left to the runtime
        pads = _values(constants, node.input[1])
    else:
        pads = _attrs(node).get("pads")
    if pads is None:
        return None
    flat = [int(p) for p in np.asarray(pads).ravel()]
    rank = n + 2
    if len(flat) != 2 * rank:
        return None
    return Geometry(pads=tuple((flat[2 + i], flat[rank + 2 + i]) for i in range(n)), name=_label(node))


def _resize(node: onnx.NodeProto, constants: Constants, n: int, position: int) -> Geometry | None:
    """Resize/Upsample by constant scales (output floor(n * scale)) or to constant sizes."""
    if position != 0:
        return None
    attrs = _attrs(node)
    inputs = list(node.input)
    if node.op_type == "Upsample":
        scales = attrs.get("scales") if len(inputs) < 2 else _values(constants, inputs[1])
        sizes = None
    else:
        at = 1 if len(inputs) == 2 else 2  # opset 10: (X, scales); later: (X, roi, scales[, sizes])
        scales = _values(constants, inputs[at]) if len(inputs) > at and inputs[at] else None
        sizes = _values(constants, inputs[3]) if len(inputs) > 3 and inputs[3] else None
        if "axes" in attrs:
            return None
    if sizes is not None and np.asarray(sizes).size == n + 2:
        return Geometry(output=tuple(int(s) for s in np.asarray(sizes).ravel()[2:]), name=_label(node))
    if scales is not None and np.asarray(scales).size == n + 2:
        return Geometry(scale=tuple(float(s) for s in np.asarray(scales).ravel()[2:]), name=_label(node))
    return None


def _space_to_depth(node: onnx.NodeProto, constants: Constants, n: int, position: int) -> Geometry | None:
    b = int(_attrs(node).get("blocksize", 1))
    return Geometry(kernel=(b,) * n, stride=(b,) * n, multiple=(b,) * n, name=_label(node))


def _depth_to_space(node: onnx.NodeProto, constants: Constants, n: int, position: int) -> Geometry | None:
    b = int(_attrs(node).get("blocksize", 1))
    return Geometry(scale=(float(b),) * n, name=_label(node))


def _reshape_constraint(node: onnx.NodeProto, constants: Constants, n: int, position: int) -> Geometry | None:
    """A Reshape to a constant shape with an inferred dim and fixed trailing dims (a reshape to a
    fixed width): the last spatial size must be a multiple of their product (sufficient when the
    leading dims are kept). The reshaped tensor itself is beyond this walk."""
    shape = _values(constants, node.input[1]) if position == 0 and len(node.input) > 1 else None
    if shape is None:
        return None
    target = [int(v) for v in np.asarray(shape).ravel()]
    fixed = [v for v in target[2:] if v > 0]
    if -1 not in target or not fixed:
        return None
    return Geometry(multiple=(1,) * (n - 1) + (int(np.prod(fixed)),), name=_label(node))


def _concat(node: onnx.NodeProto, constants: Constants, n: int, position: int) -> Geometry | None:
    axis = int(_attrs(node).get("axis", 0))
    return Geometry(name=_label(node)) if axis in (0, 1, -(n + 2), -(n + 1)) else None


def _split(node: onnx.NodeProto, constants: Constants, n: int, position: int) -> Geometry | None:
    return _concat(node, constants, n, position) if position == 0 else None


#: Op type -> reader: a Geometry for the node given the input position holding the tracked tensor,
#: or None where the walk stops.
_READERS: dict[str, Reader] = {
    **{op: _window for op in _WINDOWS},
    **{op: _global_pool for op in _GLOBAL_POOLS},
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "SpaceToDepth": _space_to_depth,
    "DepthToSpace": _depth_to_space,
    "Concat": _concat,
    "Split": _split,
}

#: Readers whose node constrains its input but whose output the walk does not follow.
_ENDS = frozenset({"Reshape"})


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                found[node.output[0]] = attr.t
    return found


def geometries(model: onnx.ModelProto, input_name: str, rank: int) -> list[Geometry]:
    """The layers of ``model``'s main graph on the paths from input ``input_name`` (of ``rank``
    spatial dims), in graph order, each reading the entries it consumes (-1: the input)."""
    graph = model.graph
    constants = _constants(graph)
    at: dict[str, int] = {input_name: -1}
    layers: list[Geometry] = []
    for node in graph.node:
        reads = [(position, at[x]) for position, x in enumerate(node.input) if x in at]
        if not reads:
            continue
        op = node.op_type if node.domain in ("", "ai.onnx") else ""
        if op in _SHAPE_KEEPING:
            layer: Geometry | None = Geometry(name=_label(node))
        elif op == "Reshape":
            layer = _reshape_constraint(node, constants, rank, reads[0][0])
        elif op in _READERS and len(reads) == 1:
            layer = _READERS[op](node, constants, rank, reads[0][0])
        else:
            layer = None
        if layer is None:
            continue
        layers.append(replace(layer, reads=tuple(dict.fromkeys(r for _, r in reads))))
        if op not in _ENDS:
            for out in node.output:
                if out:
                    at[out] = len(layers) - 1
    return layers


def input_channels(model: onnx.ModelProto, input_name: str) -> int | None:
    """Channels a Conv or BatchNormalization reading ``input_name`` directly expects, if any does."""
    constants = _constants(model.graph)
    for node in model.graph.node:
        if not node.input or node.input[0] != input_name or len(node.input) < 2:
            continue
        weight = constants.get(node.input[1])
        if weight is None:
            continue
        if node.op_type == "Conv" and len(weight.dims) >= 3:
            return int(weight.dims[1]) * int(_attrs(node).get("group", 1))
        if node.op_type in ("BatchNormalization", "InstanceNormalization") and len(weight.dims) == 1:
            return int(weight.dims[0])
    return None
