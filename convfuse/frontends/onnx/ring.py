"""The ONNX nodes of a case-2 merge's border correction (issue 14): ``y = Conv(x) + ring``.

A plan's :class:`~convfuse.planner.Merge` with a ``ring`` (:class:`~convfuse.border_map.Correction`)
is written as its Conv into a fresh tensor, then an ``Add`` of the ring:

- ``dense`` (static input size): the ring as an initializer ``[1, Co, *out]`` in the model's type;
- ``ones``: a ones map of ``x``'s grid, then one ``Conv`` per ring geometry (``Co`` outputs, one
  input channel, the merge's geometry on ``x``'s grid), summed into the ``Add``. For a static
  size the ones map is an initializer ``[1, 1, *x.spatial]`` (two nodes, few bytes; ONNX Runtime
  folds the ring Conv at load); for a dynamic one it is ``Shape(x) -> Slice[2:] -> Concat([1, 1],
  .) -> ConstantOfShape(1)``, which needs opset 10 (Slice with inputs; older opsets decline).

Not to be confused with :mod:`.border` (bias-filled borders read as zero pads, issue 16).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from ...border_map import Correction
from ...decline import Decline, Reason
from .nodes import FLOAT_TYPES, NewTensor, conv_node

__all__ = ["ring_nodes"]


def ring_nodes(
    ring: Correction,
    *,
    name: str,
    x: str,
    conv_out: str,
    y: str,
    elem_type: int,
    opset: int,
    fresh: Callable[[str], str],
) -> tuple[list[onnx.NodeProto], list[NewTensor]] | Decline:
    """The nodes (and initializers) computing ``y = conv_out + ring`` for a merge reading ``x``."""
    dtype = FLOAT_TYPES.get(elem_type)
    if dtype is None:
        return Decline(
            Reason.DTYPE, f"border ring cannot be written as {onnx.TensorProto.DataType.Name(elem_type)}"
        )
    if ring.form == "dense":
        assert ring.spatial is not None
        values = ring.map.ring(ring.spatial)
        with np.errstate(over="ignore"):
            array = np.ascontiguousarray(values[None], dtype=dtype)
        if not bool(np.isfinite(array).all()):
            return Decline(Reason.NON_FINITE, "border ring overflows the model's type")
        r_name = fresh(f"{name}.border_ring")
        add = helper.make_node("Add", [conv_out, r_name], [y], name=fresh(f"{name}/border"))
        return [add], [NewTensor(r_name, array, elem_type)]
    nodes: list[onnx.NodeProto] = []
    inits: list[NewTensor] = []

    def const(base: str, array: np.ndarray, elem: int) -> str:
        n = fresh(f"{name}.{base}")
        inits.append(NewTensor(n, array, elem))
        return n

    if ring.spatial is not None:  # a known size: the ones map is a constant
        ones = const("border_ones", np.ones((1, 1, *ring.spatial), dtype), elem_type)
        return _ring_convs(ring, name, ones, conv_out, y, elem_type, fresh, nodes, inits)
    if opset < 10:
        return Decline(
            Reason.UNSUPPORTED, "opset < 10: building the border ring from the input's shape needs Slice-10"
        )

    i64 = onnx.TensorProto.INT64
    shape, spatial, ones_shape, ones = (
        fresh(f"{name}/border_{k}") for k in ("shape", "spatial", "dims", "ones")
    )
    nodes.append(helper.make_node("Shape", [x], [shape], name=fresh(f"{name}/border_shape")))
    starts = const("border_start", np.array([2], np.int64), i64)
    ends = const("border_end", np.array([np.iinfo(np.int64).max], np.int64), i64)
    nodes.append(
        helper.make_node("Slice", [shape, starts, ends], [spatial], name=fresh(f"{name}/border_slice"))
    )
    lead = const("border_lead", np.array([1, 1], np.int64), i64)
    nodes.append(
        helper.make_node("Concat", [lead, spatial], [ones_shape], axis=0, name=fresh(f"{name}/border_dims"))
    )
    one = helper.make_tensor("value", elem_type, [1], np.ones(1, dtype).tobytes(), raw=True)
    nodes.append(
        helper.make_node(
            "ConstantOfShape", [ones_shape], [ones], value=one, name=fresh(f"{name}/border_ones")
        )
    )
    return _ring_convs(ring, name, ones, conv_out, y, elem_type, fresh, nodes, inits)


def _ring_convs(
    ring: Correction,
    name: str,
    ones: str,
    conv_out: str,
    y: str,
    elem_type: int,
    fresh: Callable[[str], str],
    nodes: list[onnx.NodeProto],
    inits: list[NewTensor],
) -> tuple[list[onnx.NodeProto], list[NewTensor]] | Decline:
    """``y = conv_out + sum_k Conv_k(ones)``, appended to ``nodes``/``inits``."""
    parts = []
    for k, spec in enumerate(ring.convs):
        part = fresh(f"{name}/border_ring{k}")
        made = conv_node(
            spec, name=fresh(f"{name}/border_conv"), x=ones, y=part, elem_type=elem_type, fresh=fresh
        )
        if isinstance(made, Decline):
            return made
        nodes.append(made[0])
        inits += made[1]
        parts.append(part)
    acc = conv_out
    for k, part in enumerate(parts):
        out = y if k == len(parts) - 1 else fresh(f"{name}/border_sum")
        nodes.append(helper.make_node("Add", [acc, part], [out], name=fresh(f"{name}/border")))
        acc = out
    return nodes, inits
