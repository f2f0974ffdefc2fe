"""The ONNX importer: a graph's linear nodes (:mod:`.nodes` reads them), sums, concats and
regrouping reshapes as the planner's :class:`~convfuse.ir.LinearGraph`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import onnx

from ...decline import Decline
from ...ir import REGROUP, LinearGraph, LinearNode, OpKind, TensorInfo
from ...planner import Merge
from ...spec import ConvSpec
from .index import _Index, _is_default, _State, _uses
from .nodes import LinearOp, label
from .stats import _PARAM_TYPES

# --------------------------------------------------------------------------- rule 2: linear regions
_OP_KINDS = {
    "bn": OpKind.BATCHNORM,
    "conv": OpKind.CONV,
    "convtranspose": OpKind.CONV_TRANSPOSE,
    "linear": OpKind.LINEAR,
    "pad": OpKind.PAD,
    "avgpool": OpKind.POOL,
    "reshape": OpKind.IDENTITY,
}


def _param_sizes(node: onnx.NodeProto, index: _Index, skip: str) -> dict[Hashable, int]:
    """Float initializers ``node`` reads (not its activation ``skip``), by name: its parameters."""
    sizes: dict[Hashable, int] = {}
    for name in node.input:
        if not name or name == skip:
            continue
        found = index.tensor(name)
        if not isinstance(found, str) and found.data_type in _PARAM_TYPES:
            sizes[name] = math.prod(found.dims)
    return sizes


def _unary_node(node: onnx.NodeProto, op: LinearOp, index: _Index) -> LinearNode:
    def build(info: TensorInfo, op: LinearOp = op) -> ConvSpec | Decline:
        return op.spec(info.ndim, info.channels)

    return LinearNode(
        label(node),
        _OP_KINDS.get(op.kind, OpKind.AFFINE),
        (op.x,),
        op.y,
        build,
        ndim=op.ndim,
        in_channels=op.in_channels,
        weights=_param_sizes(node, index, op.x),
        refused=op.refused,
        origin=(node, op),
        layout={"linear": "last", "bn": "first", "reshape": REGROUP}.get(op.kind),
        tag=op.kind,
    )


def _combining_node(node: onnx.NodeProto, index: _Index) -> LinearNode | None:
    """``Add``/``Sub``/``Sum`` of activations (a SUM) or ``Concat`` on channels (a CONCAT)."""
    if not _is_default(node) or len(node.output) != 1 or not all(node.input):
        return None
    if any(index.is_constant(n) for n in node.input):
        return None
    n = len(node.input)
    if node.op_type in ("Add", "Sub") and n == 2 or node.op_type == "Sum" and n >= 2:
        coefs = (1.0, -1.0) if node.op_type == "Sub" else (1.0,) * n
        return LinearNode(
            label(node), OpKind.SUM, tuple(node.input), node.output[0], coefs=coefs, origin=(node, None)
        )
    if node.op_type == "Concat" and n >= 2:
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), None)
        ranks = {len(d) for d in (index.shape(i) for i in node.input) if d is not None}
        if axis == 1 or (axis is not None and axis < 0 and len(ranks) == 1 and axis + ranks.pop() == 1):
            return LinearNode(
                label(node), OpKind.CONCAT, tuple(node.input), node.output[0], origin=(node, None)
            )
    return None


def _shape_of_regroup(node: onnx.NodeProto, index: _Index, inside: set[int]) -> bool:
    """``Shape(t)`` read only as the target of regrouping Reshapes of the graph's IR: it does
    not keep ``t`` computed (a merge that replaces ``t`` replaces those Reshapes too, checked by
    :func:`_stale_shape_reads`; the Shape node is then unused and cleaned up)."""
    if node.op_type != "Shape" or not _is_default(node) or node.attribute or len(node.output) != 1:
        return False
    readers = index.users(node.output[0])
    return (
        bool(readers)
        and node.output[0] not in index.output_set
        and all(
            id(r) in inside and r.op_type == "Reshape" and list(r.input[1:2]) == [node.output[0]]
            for r in readers
        )
    )


def _stale_shape_reads(index: _Index, merges: Sequence[Merge]) -> set[str]:
    """Outputs of merges that replace a tensor ``t`` read by a ``Shape`` (see
    :func:`_shape_of_regroup`) one of whose Reshapes no merge replaces: declined, so ``t`` stays."""
    merged = {id(n.origin[0]) for m in merges for n in m.nodes}
    stale: set[str] = set()
    for merge in merges:
        for t in {n.output for n in merge.nodes} - {merge.y}:
            for reader in index.users(t):
                if reader.op_type == "Shape" and any(
                    id(r) not in merged for r in index.users(reader.output[0])
                ):
                    stale.add(merge.y)
    return stale


def _linear_graph(index: _Index, state: _State) -> LinearGraph:
    """The graph's linear nodes as the planner's IR (the ONNX importer)."""
    nodes: list[LinearNode] = []
    for node in index.nodes:
        op = index.linear(node)
        ir = _unary_node(node, op, index) if op is not None else _combining_node(node, index)
        if ir is not None:
            nodes.append(ir)
    inside = {id(n.origin[0]) for n in nodes}
    external = set(index.output_set)
    for node in index.nodes:
        if id(node) not in inside and not _shape_of_regroup(node, index, inside):
            external.update(_uses(node))
    shapes: dict[str, Sequence[int | None]] = {
        t: dims
        for t in {n.output for n in nodes} | {i for n in nodes for i in n.inputs}
        if (dims := index.shape(t)) is not None
    }
    return LinearGraph(nodes, external, set(index.output_set), shapes, state.names.fresh, ring_nodes=True)
