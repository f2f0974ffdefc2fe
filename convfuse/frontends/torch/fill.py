"""Read a bias-filled border in an fx graph as a zero pad moved before the layer (issue 16).

Pattern (as the public SR blocks write it)::

    y = L(x)                            L: a 1x1 conv (stride 1, unpadded, zeros mode), a conv
                                        call with a constant 1x1 weight, or an inference BatchNorm
    y = F.pad(y, pads, "constant", v)   spatial pads >= 0
    y[:, :, 0:1, :] = b                 writes of constants into the ring (any number, any order)
    ...
    (later readers of y)

After: ``y = L(F.pad(x, pads))``, the writes gone; the zero pad then folds into the conv after it
(padding case 1 of DESIGN.md section 2). The algebra and the exact conditions are those of
docs/border_fill.md section 2 (:mod:`convfuse.border_fill` holds the shared test):

1. the writes touch only the ring: per spatial dim an index is the full dim, or a strip inside
   the begin pad (``0:1``, ``0``) or the end pad (``-1:``, ``-1``); batch and channel dims full.
   Such a footprint is the same set of ring positions at every input size;
2. every ring element of channel ``c`` holds ``z[c] = L(0)[c]`` after the writes (unwritten ones
   hold ``v``). Checked by running the writes, as torch runs them, on two padded tensors of
   small interior sizes, with the values each write reads (:class:`.fold.StateValues`);
3. ``L(x)`` has no other reader, and nothing but the writes reads ``y`` before the last write.

Otherwise the graph is left as it is, with a typed decline: ``border-value`` (a value other
than ``z``), ``border-incomplete`` (a ring element left at ``v != z``: a side left zero),
``shared-tensor``, ``unsupported``.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...border_fill import BorderResult, Moved, batchnorm_zero_response, conv_zero_response, fill_matches
from ...decline import Decline, Reason
from .capture import MISSING, raw_attribute
from .fold import StateValues, label

__all__ = ["read_borders"]

_CONV = nn.modules.conv._ConvNd
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_CONV_CALLS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_PADS = {F.pad, torch.constant_pad_nd}
_INTERIORS = (2, 3)  # interior sizes the writes are run on (per spatial dim: 2 and 3 rows)


def _is_setitem(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.setitem) or (
        node.op == "call_method" and node.target == "__setitem__"
    )


def _const(node: Any, values: StateValues) -> Any:
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return raw_attribute(values.gm, str(node.target))
    return MISSING


def _zero_response(
    layer: fx.Node, gm: fx.GraphModule, values: StateValues
) -> tuple[np.ndarray, np.ndarray, int, torch.dtype] | str:
    """``z``, its slack, the spatial rank and the dtype of position-wise ``layer``, or why not."""
    if layer.op == "call_module":
        m = gm.get_submodule(str(layer.target))
        if isinstance(m, _CONV) and not m.transposed:
            if (
                any(k != 1 for k in m.kernel_size)
                or any(s != 1 for s in m.stride)
                or m.padding_mode != "zeros"
                or (isinstance(m.padding, str) and m.padding != "valid" and m.padding != "same")
                or (not isinstance(m.padding, str) and any(p != 0 for p in m.padding))
            ):
                return f"{layer.target} is not a 1x1 conv with stride 1 and no padding"
            bias = None if m.bias is None else m.bias.detach().double().cpu().numpy()
            z, slack = conv_zero_response(bias, m.out_channels)
            return z, slack, len(m.kernel_size), m.weight.dtype
        if isinstance(m, _BATCHNORM) and not m.training and m.track_running_stats:
            rank = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(m))
            if rank is None or m.running_mean is None:
                return f"{layer.target} is a {type(m).__name__} of unknown rank"
            ones = torch.ones(m.num_features, dtype=torch.float64)
            gamma = ones if m.weight is None else m.weight.detach().double()
            beta = ones * 0 if m.bias is None else m.bias.detach().double()
            z, slack = batchnorm_zero_response(
                gamma.numpy(),
                beta.numpy(),
                m.running_mean.double().numpy(),
                m.running_var.double().numpy(),  # type: ignore[union-attr]
                m.eps,
            )
            return z, slack, rank, m.running_mean.dtype
        return f"{layer.target} is not a 1x1 conv or a BatchNorm"
    if layer.op == "call_function" and layer.target in _CONV_CALLS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, layer.args))
        bound.update(layer.kwargs)
        w, b = _const(bound.get("weight"), values), _const(bound.get("bias"), values)
        stride, padding = bound.get("stride", 1), bound.get("padding", 0)
        if not isinstance(w, torch.Tensor) or (b is not None and not isinstance(b, torch.Tensor)):
            return f"{layer.name}'s weight or bias is not a stored constant"
        if any(k != 1 for k in w.shape[2:]) or stride not in (1, (1,) * (w.dim() - 2), [1] * (w.dim() - 2)):
            return f"{layer.name} is not a 1x1 conv with stride 1"
        if padding not in (0, "valid", (0,) * (w.dim() - 2), [0] * (w.dim() - 2)):
            return f"{layer.name} pads"
        z, slack = conv_zero_response(None if b is None else b.detach().double().numpy(), int(w.shape[0]))
        return z, slack, w.dim() - 2, w.dtype
    return f"{layer.name} is not a 1x1 conv or a BatchNorm"


def _pad_args(pad: fx.Node) -> tuple[fx.Node, tuple[int, ...], float] | None:
    names = ("input", "pad", "mode", "value")
    bound: dict[str, Any] = {"mode": "constant", "value": None}
    bound.update(zip(names, pad.args))
    bound.update(pad.kwargs)
    pads = bound.get("pad")
    if not isinstance(bound.get("input"), fx.Node) or not isinstance(pads, (tuple, list)):
        return None
    if bound["mode"] != "constant" or not all(isinstance(p, int) for p in pads):
        return None
    value = bound["value"]
    if value is not None and not isinstance(value, (int, float)):
        return None
    return bound["input"], tuple(int(p) for p in pads), float(value or 0.0)


def _footprint_ok(index: Any, rank: int, pads: list[tuple[int, int]]) -> bool:
    """Whether ``index`` writes a size-independent part of the ring (module docstring, 1)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, fx.Node) for i in items):
        return False
    if items.count(Ellipsis) > 1:
        return False
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (rank - len(items) + 1) + items[k + 1 :]
    items += [slice(None)] * (rank - len(items))
    if len(items) != rank:
        return False

    def full(i: Any) -> bool:
        return isinstance(i, slice) and i.step in (None, 1) and i.start in (None, 0) and i.stop is None

    if not (full(items[0]) and full(items[1])):
        return False
    for i, (begin, end) in zip(items[2:], pads):
        if full(i):
            continue
        if isinstance(i, bool) or not isinstance(i, (int, slice)):
            return False
        if isinstance(i, int):
            lo, hi = i, (i + 1 if i != -1 else None)
        else:
            if i.step not in (None, 1):
                return False
            lo, hi = (0 if i.start is None else i.start), i.stop
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)):
            return False
        if lo >= 0:
            if hi is None or not (lo < hi <= begin):
                return False
        elif not (-end <= lo and (hi is None or lo < hi <= 0)):
            return False
    return True


def _run_writes(
    shape: tuple[int, ...],
    fill: float,
    dtype: torch.dtype,
    writes: list[fx.Node],
    values: StateValues,
) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The padded tensor after the writes (interior NaN) and the mask of written elements."""
    t = torch.full(shape, fill, dtype=dtype)
    written = torch.zeros(shape, dtype=torch.bool)
    for w in writes:
        index: Any = w.args[1]
        value: Any = w.args[2]
        v = values.snapshot(w, value) if isinstance(value, fx.Node) else value
        if v is MISSING:
            return f"{w.name} writes a value that is not constant"
        try:
            t[index] = v
            written[index] = True
        except Exception as exc:  # noqa: BLE001 - a write that does not fit this size
            return f"{w.name} cannot be replayed ({exc})"
    return t, written


def _swap(old: fx.Node, new: fx.Node) -> Any:
    """An argument map for ``Graph.node_copy``: ``old`` read as ``new``."""
    return lambda n: new if n is old else n


def read_borders(gm: fx.GraphModule, values: StateValues) -> BorderResult:
    """Rewrite every bias-filled border of ``gm``'s graph in place (module docstring)."""
    graph = gm.graph
    result = BorderResult()
    order = {n: i for i, n in enumerate(graph.nodes)}
    found: list[tuple[fx.Node, fx.Node, fx.Node, list[fx.Node], tuple[int, ...], float]] = []
    for pad in list(graph.nodes):
        if pad.op != "call_function" or pad.target not in _PADS:
            continue
        parsed = _pad_args(pad)
        if parsed is None:
            continue
        layer, flat, fill = parsed
        writes = [u for u in pad.users if _is_setitem(u) and u.args[0] is pad]
        if not writes and fill == 0.0:
            continue  # a plain zero pad: the planner's case
        if not writes:
            continue  # a constant pad with no writes: not this pattern
        found.append((pad, layer, layer.args[0] if layer.args else None, writes, flat, fill))  # type: ignore[arg-type]
    if not found:
        return result
    values.run(
        {(w, w.args[2]) for *_, writes, _, _ in found for w in writes if isinstance(w.args[2], fx.Node)}
    )
    for pad, layer, x, writes, flat, fill in found:
        sources = (label(layer), label(pad), *(label(w) for w in writes))
        z = _zero_response(layer, gm, values)
        if isinstance(z, str):
            result.declines.append((sources, Decline(Reason.UNSUPPORTED, f"border fill not moved: {z}")))
            continue
        zero, slack, ndim, dtype = z
        if len(layer.users) != 1 or not isinstance(x, fx.Node):
            result.declines.append(
                (sources, Decline(Reason.SHARED_TENSOR, f"{layer.name}'s output has other readers"))
            )
            continue
        last = max(order[w] for w in writes)
        early = [u for u in pad.users if u not in writes and order[u] < last]
        if early:
            result.declines.append(
                (
                    sources,
                    Decline(
                        Reason.SHARED_TENSOR, f"{early[0].name} reads {pad.name} before its ring is written"
                    ),
                )
            )
            continue
        if len(flat) % 2 or len(flat) // 2 > ndim or any(p < 0 for p in flat):
            result.declines.append(
                (sources, Decline(Reason.UNSUPPORTED, f"{pad.name} pads batch/channels or crops"))
            )
            continue
        pairs = [(flat[2 * k], flat[2 * k + 1]) for k in range(len(flat) // 2)][::-1]  # dim order
        pads = [(0, 0)] * (ndim - len(pairs)) + pairs
        bad = next((w for w in writes if not _footprint_ok(w.args[1], ndim + 2, pads)), None)
        if bad is not None:
            result.declines.append(
                (
                    sources,
                    Decline(
                        Reason.BORDER_INCOMPLETE,
                        f"{bad.name} writes {bad.args[1]!r}, not a strip of the ring the same at every size",
                    ),
                )
            )
            continue
        decline = None
        channels = zero.shape[0]
        for size in _INTERIORS:
            shape = (2, channels, *(b + size + e for b, e in pads))
            ran = _run_writes(shape, fill, dtype, writes, values)
            if isinstance(ran, str):
                decline = Decline(Reason.UNSUPPORTED, ran)
                break
            t, written = ran
            ring = torch.ones(shape, dtype=torch.bool)
            ring[(slice(None), slice(None), *(slice(b, b + size) for b, _ in pads))] = False
            channel = (1, -1) + (1,) * ndim
            ok = fill_matches(
                t.double().numpy(),
                zero.reshape(channel),
                slack.reshape(channel),
                np.dtype(str(dtype).split(".")[-1]),
            )
            wrong = ring.numpy() & ~ok
            if wrong.any():
                at = tuple(int(i) for i in np.argwhere(wrong)[0])
                if (wrong & ~written.numpy()).any():
                    decline = Decline(
                        Reason.BORDER_INCOMPLETE,
                        f"ring element(s) are not written and keep the pad value {fill:g} (e.g. at {at}), "
                        f"not {layer.name}'s zero response",
                    )
                else:
                    decline = Decline(
                        Reason.BORDER_VALUE,
                        f"ring value {float(t[at]):.9g} at {at} is not {layer.name}'s zero response "
                        f"{float(zero[at[1]]):.9g}",
                    )
                break
        if decline is not None:
            result.declines.append((sources, decline))
            continue
        zero_pads = tuple(flat)
        with graph.inserting_before(layer):
            padded = graph.call_function(F.pad, (x, zero_pads), {"mode": "constant", "value": 0.0})
            moved = graph.node_copy(layer, _swap(x, padded))
        padded.meta = {k: v for k, v in pad.meta.items() if k == "nn_module_stack"}
        moved.meta = {k: v for k, v in layer.meta.items() if k == "nn_module_stack"}
        for w in writes:
            graph.erase_node(w)
        pad.replace_all_uses_with(moved)
        graph.erase_node(pad)
        graph.erase_node(layer)
        result.moved.append(Moved(label(layer), label(pad), tuple(label(w) for w in writes)))
    return result
