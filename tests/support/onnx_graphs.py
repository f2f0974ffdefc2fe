"""Hypothesis strategy for random valid ONNX graphs mixing the ops convfuse reads.

Conv (every attribute form: explicit asymmetric pads, SAME_UPPER, SAME_LOWER, VALID, omitted
attributes), BatchNormalization, Add (of branches and of unrelated tensors), Mul/Add by
constants on either side, Relu, Concat, Pad, AveragePool, Identity; tensors are freely shared
between consumers and sometimes exposed as extra graph outputs. Models are float32 or
(one in five) float16, at opset 11, 13 or 17; a constant is sometimes a ``Constant`` node
instead of an initializer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper, numpy_helper

__all__ = ["random_model"]


@dataclass
class _Value:
    name: str
    channels: int
    spatial: tuple[int, ...]


#: IR version ONNX Runtime accepts for each opset drawn.
_IR_FOR_OPSET = {11: 6, 13: 7, 17: 8}


@dataclass
class _Builder:
    ndim: int
    rng: np.random.Generator
    dtype: type = np.float32
    constant_nodes: float = 0.0  # probability that a constant is a Constant node
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    values: list[_Value] = field(default_factory=list)
    count: int = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str) -> str:
        name = self.fresh(prefix)
        tensor = numpy_helper.from_array(np.asarray(array).astype(self.dtype), name)
        if self.rng.random() < self.constant_nodes:
            self.nodes.append(
                helper.make_node("Constant", [], [name], name=self.fresh("Constant_n"), value=tensor)
            )
        else:
            self.inits.append(tensor)
        return name

    def add(self, op: str, inputs: list[str], channels: int, spatial: tuple[int, ...], **attrs) -> _Value:
        out = _Value(self.fresh(op.lower() + "_"), channels, spatial)
        self.nodes.append(helper.make_node(op, inputs, [out.name], name=self.fresh(op + "_n"), **attrs))
        self.values.append(out)
        return out


def _conv(
    draw: st.DrawFn, b: _Builder, src: _Value, same_shape: bool = False, out_channels: int | None = None
) -> _Value | None:
    """A Conv on ``src``; with ``same_shape`` it keeps ``src``'s spatial size (for branches)."""
    n = b.ndim
    groups = draw(st.sampled_from([g for g in (1, 2, src.channels) if src.channels % g == 0]))
    co = out_channels if out_channels is not None else draw(st.sampled_from([groups, 2 * groups, 4 * groups]))
    if co % groups:
        groups = 1
    kernel = tuple(draw(st.sampled_from([1, 1, 2, 3, 3, 5])) for _ in range(n))
    attrs: dict = {}
    if same_shape:
        form = draw(st.sampled_from(["pads", "SAME_UPPER", "SAME_LOWER"]))
        stride = (1,) * n
        dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(n))
    else:
        form = draw(st.sampled_from(["pads", "pads", "SAME_UPPER", "SAME_LOWER", "VALID", "omitted"]))
        stride = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(n))
        dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(n))
    if form in ("SAME_UPPER", "SAME_LOWER"):
        dilation = (1,) * n  # ONNX Runtime rejects dilation with auto_pad SAME_*
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if form == "omitted":
        if any(s != 1 for s in stride) or any(d != 1 for d in dilation):
            form = "pads"
        else:
            pads = [(0, 0)] * n
    if form == "pads":
        pads = []
        for e in extent:
            if same_shape:
                total = e - 1
                begin = draw(st.integers(0, total))
                pads.append((begin, total - begin))
            else:
                pads.append((draw(st.integers(0, 2)), draw(st.integers(0, 2))))
        attrs["pads"] = [p[0] for p in pads] + [p[1] for p in pads]
    elif form in ("SAME_UPPER", "SAME_LOWER"):
        attrs["auto_pad"] = form
    elif form == "VALID":
        attrs["auto_pad"] = "VALID"
        pads = [(0, 0)] * n
    if form != "omitted":
        attrs["strides"] = list(stride)
        attrs["dilations"] = list(dilation)
        attrs["kernel_shape"] = list(kernel)
        if groups != 1 or draw(st.booleans()):
            attrs["group"] = groups
    elif groups != 1:
        attrs["group"] = groups
    if form in ("SAME_UPPER", "SAME_LOWER"):
        spatial = tuple(math.ceil(x / s) for x, s in zip(src.spatial, stride))
    else:
        spatial = tuple(
            (x + p0 + p1 - e) // s + 1 for x, (p0, p1), e, s in zip(src.spatial, pads, extent, stride)
        )
    if min(spatial) < 1:
        return None
    w = b.const(b.rng.standard_normal((co, src.channels // groups, *kernel)) * 0.5, "W")
    inputs = [src.name, w]
    if draw(st.booleans()):
        inputs.append(b.const(b.rng.standard_normal(co) * 0.5, "B"))
    return b.add("Conv", inputs, co, spatial, **attrs)


def _bn(b: _Builder, src: _Value) -> _Value:
    c = src.channels
    scale = b.const(b.rng.uniform(0.5, 1.5, c), "gamma")
    bias = b.const(b.rng.standard_normal(c) * 0.3, "beta")
    mean = b.const(b.rng.standard_normal(c) * 0.3, "mean")
    var = b.const(b.rng.uniform(0.5, 1.5, c), "var")
    return b.add("BatchNormalization", [src.name, scale, bias, mean, var], c, src.spatial, epsilon=1e-3)


def _branch(draw: st.DrawFn, b: _Builder, src: _Value, channels: int) -> _Value | None:
    kind = draw(st.sampled_from(["conv", "conv", "conv_bn", "bn", "identity", "pool"]))
    if kind in ("bn", "identity", "pool") and channels != src.channels:
        kind = "conv"
    if kind == "conv":
        return _conv(draw, b, src, same_shape=True, out_channels=channels)
    if kind == "conv_bn":
        conv = _conv(draw, b, src, same_shape=True, out_channels=channels)
        return None if conv is None else _bn(b, conv)
    if kind == "bn":
        return _bn(b, src)
    if kind == "identity":
        return src if draw(st.booleans()) else b.add("Identity", [src.name], src.channels, src.spatial)
    include = draw(st.sampled_from([0, 1]))
    return b.add(
        "AveragePool",
        [src.name],
        src.channels,
        src.spatial,
        kernel_shape=[3] * b.ndim,
        strides=[1] * b.ndim,
        pads=[1] * (2 * b.ndim),
        count_include_pad=include,
    )


@st.composite
def random_model(draw: st.DrawFn, max_ops: int = 8, opset: int | None = None) -> onnx.ModelProto:
    """A random valid float32 or float16 model with one input ``x`` and one to three outputs."""
    ndim = draw(st.sampled_from([1, 2, 2, 2, 3]))
    spatial = tuple(draw(st.integers(3, 9 if ndim < 3 else 5)) for _ in range(ndim))
    channels = draw(st.sampled_from([1, 2, 3, 4]))
    dtype = draw(st.sampled_from([np.float32] * 4 + [np.float16]))
    constant_nodes = draw(st.sampled_from([0.0, 0.0, 0.5]))
    b = _Builder(ndim, np.random.default_rng(draw(st.integers(0, 2**31 - 1))), dtype, constant_nodes)
    x = _Value("x", channels, spatial)
    b.values.append(x)
    for _ in range(draw(st.integers(1, max_ops))):
        src = (
            draw(st.sampled_from(b.values[-3:]))
            if draw(st.integers(0, 3))
            else draw(st.sampled_from(b.values))
        )
        op = draw(
            st.sampled_from(
                ["conv", "conv", "conv", "sum", "sum", "bn", "relu", "affine", "concat", "pad", "add2"]
            )
        )
        if op == "conv":
            _conv(draw, b, src)
        elif op == "sum":
            co = draw(st.sampled_from([src.channels, 2 * src.channels]))
            branches = [_branch(draw, b, src, co) for _ in range(draw(st.integers(2, 3)))]
            branches = [br for br in branches if br is not None]
            if len(branches) >= 2:
                if len(branches) == 2 or draw(st.booleans()):
                    acc = branches[0]
                    for br in branches[1:]:
                        acc = b.add("Add", [acc.name, br.name], co, src.spatial)
                else:
                    b.add("Sum", [br.name for br in branches], co, src.spatial)
        elif op == "bn":
            _bn(b, src)
        elif op == "relu":
            b.add("Relu", [src.name], src.channels, src.spatial)
        elif op == "affine":
            per_channel = draw(st.booleans())
            shape = (src.channels, *([1] * ndim)) if per_channel else ()
            const = b.const(b.rng.standard_normal(shape) * 0.5 + 1.0, "k")
            kind = draw(st.sampled_from(["Mul", "Add"]))
            ins = [src.name, const] if draw(st.booleans()) else [const, src.name]
            b.add(kind, ins, src.channels, src.spatial)
        elif op == "concat":
            partners = [v for v in b.values if v.spatial == src.spatial]
            other = draw(st.sampled_from(partners))
            b.add("Concat", [src.name, other.name], src.channels + other.channels, src.spatial, axis=1)
        elif op == "pad":
            pads = [draw(st.integers(0, 2)) for _ in range(2 * ndim)]
            full = [0, 0] + pads[:ndim] + [0, 0] + pads[ndim:]
            pads_name = b.fresh("pads")
            b.inits.append(numpy_helper.from_array(np.array(full, dtype=np.int64), pads_name))
            out_spatial = tuple(s + pads[i] + pads[ndim + i] for i, s in enumerate(src.spatial))
            padded = b.add("Pad", [src.name, pads_name], src.channels, out_spatial, mode="constant")
            _conv(draw, b, padded)
        elif op == "add2":
            partners = [v for v in b.values if v.spatial == src.spatial and v.channels == src.channels]
            other = draw(st.sampled_from(partners))
            b.add("Add", [src.name, other.name], src.channels, src.spatial)
    if not b.nodes:
        b.add("Relu", ["x"], channels, spatial)
    last = b.values[-1]
    outputs = [last]
    for v in b.values[1:-1]:
        if v not in outputs and draw(st.integers(0, 9)) == 0:
            outputs.append(v)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        b.nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", elem, [1, channels, *spatial])],
        [helper.make_tensor_value_info(v.name, elem, [1, v.channels, *v.spatial]) for v in outputs],
        initializer=b.inits,
    )
    opset = opset or draw(st.sampled_from([11, 13, 17, 17]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fuzz")
    model.ir_version = _IR_FOR_OPSET.get(opset, 8)
    return model
