"""Read a bias-filled border as a padding, and move it before the layer that maps zero to it.

Pattern (ONNX)::

    t0 = L(x)                   L: Conv with 1x1 kernel, stride 1, no padding; or inference BN
    t1 = Pad(t0, pads, v)       constant mode, spatial pads >= 0 only
    t2 = ScatterND(t1, I1, U1)  ... zero or more writes with constant indices and updates
    y  = ScatterND(tk, Ik, Uk)

After: ``y = L(Pad(x, pads, 0))``, so the zero Pad is then folded into the conv that follows by
the existing chain rule (padding case 1 of DESIGN.md section 2).

Algebra. ``L`` acts on each position independently (a 1x1 conv, stride 1, unpadded, or a BN:
``L(x)[c, p] = sum_i W[c, i] x[i, p] + z[c]``), so ``L`` commutes with zero padding up to its
zero response: ``L(pad0(x))`` equals ``pad(L(x))`` whose ring holds ``L(0) = z``, per channel
(``z = bias`` for the conv, ``z = beta - mean * gamma / sqrt(var + eps)`` for the BN). The writes
give ``y`` a ring of constants. The rewrite is exact when (the conditions, checked on the actual
index and update tensors of a static shape):

1. the writes touch only the ring, never the interior ``t0`` occupies;
2. every ring element of channel ``c`` holds ``z[c]`` after the writes (a ring element left
   unwritten holds the pad value ``v``, which must then equal ``z[c]``);
3. ``t0`` and every intermediate ``ti`` have no other reader and are not graph outputs.

Equality is exact in the stored dtype for a conv (the border is its bias, copied); for a BN the
runtime computes ``z`` in the model's dtype with a few roundings, so values within
``4 * eps * (|beta| + |mean * a|)`` of the float64 ``z`` are accepted (the difference is below the
runtime's own rounding of ``BN(0)``). Otherwise the graph is left as it is, with a typed decline.
See docs/border_fill.md for the derivation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...border_fill import BorderResult, Moved, batchnorm_zero_response, conv_zero_response, fill_matches
from ...decline import Decline, Reason
from .fold import graph_reads, prune, static_shapes
from .io import node_attributes

__all__ = ["BorderResult", "Moved", "read_borders", "zero_response"]

_DEFAULT = ("", "ai.onnx")


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        inputs = {i.name for i in graph.input}
        self.constants = {t.name: t for t in graph.initializer if t.name not in inputs}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in graph_reads(node):
                self.readers.setdefault(name, []).append(node)
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant" and node.domain in _DEFAULT:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = attr.t
        self.outputs = {o.name for o in graph.output}

    def value(self, name: str) -> np.ndarray | None:
        found = self.constants.get(name)
        return None if found is None else numpy_helper.to_array(found)

    def sole_reader(self, name: str) -> onnx.NodeProto | None:
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None


def zero_response(node: onnx.NodeProto, g: _Graph) -> tuple[np.ndarray, np.ndarray] | str:
    """What ``node`` maps an all-zero input to, per channel (float64), and the magnitude of the
    terms the runtime rounds computing it (zero for a conv: its bias is stored as is); or why
    ``node`` is not a position-wise layer."""
    attrs = node_attributes(node)
    if node.op_type == "Conv" and node.domain in _DEFAULT and len(node.input) >= 2:
        w = g.constants.get(node.input[1])
        if w is None or any(d != 1 for d in w.dims[2:]):
            return f"{_label(node)} is not a 1x1 conv with a constant weight"
        n = len(w.dims) - 2
        if any(s != 1 for s in attrs.get("strides", [1] * n)) or any(
            p != 0 for p in attrs.get("pads", [0] * 2 * n)
        ):
            return f"{_label(node)} has a stride or padding"
        bias = g.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(int(w.dims[0]))
        if bias is None:
            return f"{_label(node)}'s bias is not constant"
        return conv_zero_response(bias, int(w.dims[0]))
    if node.op_type == "BatchNormalization" and node.domain in _DEFAULT and len(node.input) == 5:
        if len([o for o in node.output if o]) != 1 or attrs.get("training_mode", 0):
            return f"{_label(node)} is in training mode"
        params = [g.value(n) for n in node.input[1:]]
        if any(p is None for p in params):
            return f"{_label(node)}'s parameters are not constant"
        gamma, beta, mean, var = params
        return batchnorm_zero_response(gamma, beta, mean, var, float(attrs.get("epsilon", 1e-5)))  # type: ignore[arg-type]
    return f"{_label(node)} ({node.op_type}) is not a 1x1 conv or a BatchNormalization"


def _pad_geometry(pad: onnx.NodeProto, g: _Graph, opset: int) -> tuple[np.ndarray, float] | str:
    """The pads (begin..., end...) and the constant value of a constant-mode Pad."""
    attrs = node_attributes(pad)
    if attrs.get("mode", "constant") != "constant":
        return f"{_label(pad)} pads with mode {attrs.get('mode')!r}"
    if opset < 11:
        return np.asarray(attrs.get("pads", []), dtype=np.int64), float(attrs.get("value", 0.0))
    if len(pad.input) > 3 and pad.input[3]:
        return f"{_label(pad)} pads chosen axes"
    pads = g.value(pad.input[1]) if len(pad.input) > 1 else None
    if pads is None:
        return f"{_label(pad)}'s pads are not constant"
    value = g.value(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    if value is None:
        return f"{_label(pad)}'s value is not constant"
    return pads.astype(np.int64), float(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else 0.0


def _writes(start: str, g: _Graph) -> list[onnx.NodeProto]:
    """The chain of ScatterND nodes writing constants into ``start``, each the sole reader."""
    chain: list[onnx.NodeProto] = []
    name = start
    while True:
        node = g.sole_reader(name)
        if (
            node is None
            or node.op_type != "ScatterND"
            or node.input[0] != name
            or node_attributes(node).get("reduction", "none") != "none"
            or g.value(node.input[1]) is None
            or g.value(node.input[2]) is None
        ):
            return chain
        chain.append(node)
        name = node.output[0]


def _check_ring(
    shape: tuple[int, ...],
    pads: np.ndarray,
    fill: float,
    writes: list[onnx.NodeProto],
    g: _Graph,
    z: np.ndarray,
    slack: np.ndarray,
    dtype: np.dtype,
) -> Decline | None:
    """Simulate the writes on the padded shape; the decline if the ring is not ``z`` everywhere."""
    rank = len(shape)
    if z.shape != (shape[1],):
        return Decline(Reason.CHANNEL_MISMATCH, f"{z.size} zero-response values for {shape[1]} channels")
    interior = np.zeros(shape, dtype=bool)
    inner = tuple(slice(int(pads[i]), shape[i] - int(pads[i + rank])) for i in range(rank))
    interior[inner] = True
    ring = ~interior
    written = np.zeros(shape, dtype=bool)
    values = np.full(shape, fill, dtype=np.float64)
    for node in writes:
        idx, upd = g.value(node.input[1]), g.value(node.input[2])
        assert idx is not None and upd is not None
        k = idx.shape[-1]
        flat = idx.reshape(-1, k).astype(np.int64)
        flat = np.where(flat < 0, flat + np.asarray(shape[:k]), flat)
        if k > rank or np.any(flat < 0) or np.any(flat >= np.asarray(shape[:k])):
            return Decline(Reason.UNSUPPORTED, f"{_label(node)} has indices out of range")
        if len(np.unique(flat, axis=0)) != len(flat):
            return Decline(
                Reason.UNSUPPORTED, f"{_label(node)} writes an element twice (the order is undefined)"
            )
        where = tuple(flat.T)
        if np.any(interior[where]):
            return Decline(
                Reason.BORDER_INCOMPLETE, f"{_label(node)} writes inside the padded tensor, not only its ring"
            )
        written[where] = True
        values[where] = upd.reshape(flat.shape[0], *shape[k:]).astype(np.float64)
    channel = (1, -1) + (1,) * (rank - 2)
    bad = ring & ~fill_matches(values, z.reshape(channel), slack.reshape(channel), dtype)
    if not bad.any():
        return None
    unwritten = bad & ~written
    at = tuple(int(i) for i in np.argwhere(bad)[0])
    if unwritten.any():
        return Decline(
            Reason.BORDER_INCOMPLETE,
            f"{int(unwritten.sum())} ring element(s) are not written and keep the pad value {fill:g} "
            f"(e.g. at {at}), not the layer's zero response",
        )
    return Decline(
        Reason.BORDER_VALUE,
        f"ring value {values[at]:.9g} at {at} is not the layer's zero response "
        f"{float(z.reshape(-1)[at[1]]):.9g}",
    )


def read_borders(model: onnx.ModelProto) -> BorderResult:
    """Rewrite every bias-filled border of ``model``'s main graph in place (module docstring)."""
    graph = model.graph
    opset = next((int(e.version) for e in model.opset_import if e.domain in _DEFAULT), 1)
    live_before = {o.name for o in graph.output} | {n for node in graph.node for n in graph_reads(node)}
    g = _Graph(model)
    shapes = static_shapes(model)
    result = BorderResult()
    replace: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    taken = {n for node in g.nodes for n in [*node.input, *node.output]} | {t.name for t in graph.initializer}
    for pad in g.nodes:
        if pad.op_type != "Pad" or pad.domain not in _DEFAULT or id(pad) in removed:
            continue
        layer = g.producer.get(pad.input[0])
        geometry = _pad_geometry(pad, g, opset)
        writes = _writes(pad.output[0], g)
        if layer is None or isinstance(geometry, str):
            continue
        pads, fill = geometry
        if not writes and fill == 0.0:
            continue  # a plain zero pad: the planner's case
        sources = [_label(layer), _label(pad), *(_label(w) for w in writes)]
        z = zero_response(layer, g)
        if isinstance(z, str):
            if writes:
                result.declines.append((sources, Decline(Reason.UNSUPPORTED, f"border fill not moved: {z}")))
            continue
        reader = g.sole_reader(layer.output[0])
        # (`reader is None` first: on `x is not pad` alone mypy widens `pad` to x's Optional type)
        if reader is None or reader is not pad:
            result.declines.append(
                (sources, Decline(Reason.SHARED_TENSOR, f"{layer.output[0]!r} has other readers"))
            )
            continue
        entry = shapes.get(pad.output[0])
        rank = len(pads) // 2
        if (
            entry is None
            or entry[1] is None
            or len(entry[1]) != rank
            or any(d is None for d in entry[1])
            or rank < 3
        ):
            result.declines.append(
                (sources, Decline(Reason.UNSUPPORTED, "the padded tensor's shape is not static"))
            )
            continue
        if np.any(pads < 0) or np.any(pads[[0, 1, rank, rank + 1]] != 0):
            result.declines.append(
                (sources, Decline(Reason.UNSUPPORTED, f"{_label(pad)} pads batch/channels or crops"))
            )
            continue
        values, slack = z
        dtype = helper.tensor_dtype_to_np_dtype(entry[0])
        decline = _check_ring(tuple(entry[1]), pads, fill, writes, g, values, slack, np.dtype(dtype))  # type: ignore[arg-type]
        if decline is not None:
            result.declines.append((sources, decline))
            continue
        final = writes[-1].output[0] if writes else pad.output[0]
        padded = _fresh(f"{layer.input[0]}_padded", taken)
        zero_pad = onnx.NodeProto()
        zero_pad.CopyFrom(pad)
        del zero_pad.input[:]
        zero_pad.input.extend([layer.input[0], *pad.input[1:2]] if opset >= 11 else [layer.input[0]])
        del zero_pad.output[:]
        zero_pad.output.append(padded)
        if opset < 11:
            for attr in zero_pad.attribute:
                if attr.name == "value":
                    attr.f = 0.0
        moved = onnx.NodeProto()
        moved.CopyFrom(layer)
        moved.input[0] = padded
        moved.output[0] = final
        replace[id(layer)] = [zero_pad, moved]
        removed.update(id(n) for n in (layer, pad, *writes))
        result.moved.append(Moved(_label(layer), _label(pad), tuple(_label(w) for w in writes)))
    if result.moved:
        nodes: list[onnx.NodeProto] = []
        for node in g.nodes:
            nodes.extend(replace.get(id(node), [] if id(node) in removed else [node]))
        del graph.node[:]
        graph.node.extend(nodes)
        prune(graph, live_before)
    return result


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name
