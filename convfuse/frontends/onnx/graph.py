"""The ONNX front end: an importer to the planner's IR and an exporter of its plan.

Rules (:data:`RULES`), applied to every graph, subgraphs first:

1. **Identity.** ``y = Identity(x)``: consumers read ``x`` instead. When ``y`` is a graph output,
   ``x``'s producer writes ``y`` directly (graph outputs keep their names), if it can. Repeated
   until nothing changes.
2. **Linear regions.** Every node :mod:`.onnx_nodes` reads as linear in one activation (Conv,
   inference BatchNormalization, Mul/Add/Sub/Div by a per-channel constant, Neg, zero Pad,
   AveragePool) and every ``Add``/``Sub``/``Sum`` of activations and ``Concat`` on channels
   becomes a :class:`~convfuse.ir.LinearNode`; :func:`convfuse.planner.plan` finds the regions
   and decides what merges; each merge becomes one Conv, each sum left with fewer terms is
   rebuilt from Add/Sub (or one Sum). Run once.

A tensor read by a node that is not linear, or that is a graph output, is never merged away.
Merged nodes take the name of the first convolution they replace; untouched nodes are left as
they are.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...algebra import Cost
from ...decline import Decline, Reason
from ...errors import InvalidModelError, InvalidOptionError
from ...ir import REGROUP, LinearGraph, LinearNode, OpKind, TensorInfo
from ...latency import judge_for
from ...planner import Merge, Resum, plan
from ...policy import Judge, Policy
from ...report import ModelStats, Report
from ...spec import ConvSpec
from ...timing import DEFAULT_BUDGET, Timer
from ...transpose import ConvTransposeSpec
from .io import MAX_PROTOBUF, LoadedModel, check_model, load_model, serialized_size, subgraphs
from .nodes import (
    FLOAT_TYPES,
    Dims,
    LinearOp,
    NewTensor,
    conv_macs,
    conv_node,
    label,
    linear_nodes,
    mark_merged,
    read_linear,
    unread_nodes,
)
from .prepass import prepare
from .ring import ring_nodes
from .transpose import new_tensors, transpose_node

__all__ = ["REPORTED_OPS", "RULES", "fuse_onnx", "infer_shapes", "model_stats"]

#: Op types always shown in the before/after summary (others only when their count changes).
REPORTED_OPS = ("Conv", "BatchNormalization", "Add")
#: Listed in the before/after counts whenever the model has them (merged or not).
_SHOWN_WHEN_PRESENT = ("ConvTranspose",)

#: Ops on small constants that are evaluated to read a constant input (exporters compute
#: ``F.pad``'s pads this way); nodes of these types left unused by a merge are removed.
_FOLDABLE = frozenset(
    {"Constant", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Unsqueeze", "Squeeze", "Gather",
     "Shape", "Mul", "Sub", "Add", "Div", "Range", "Expand"}  # fmt: skip
)
#: Initializers with at most this many elements keep their data for shape inference.
_SMALL_CONSTANT = 1024
#: Safety stop for the rewrite loop (each round removes at least one node or sum term).
_MAX_ROUNDS = 100

_ZERO = Cost(0, 0)

Progress = Callable[[str], None]
Shapes = dict[str, tuple[int, Dims | None]]
_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------- graph helpers
def _outer_refs(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` (a subgraph) reads from enclosing scopes, in order of first use."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    refs: dict[str, None] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                refs[name] = None
        for sub in subgraphs(node):
            for name in _outer_refs(sub):
                if name not in defined:
                    refs[name] = None
        defined.update(o for o in node.output if o)
    for out in graph.output:
        if out.name not in defined:
            refs[out.name] = None
    return list(refs)


def _uses(node: onnx.NodeProto) -> list[str]:
    """Every name ``node`` reads: its inputs (once per slot) and its subgraphs' outer names."""
    names = [n for n in node.input if n]
    for sub in subgraphs(node):
        names.extend(_outer_refs(sub))
    return names


def _referenced(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> set[str]:
    names = {o.name for o in graph.output}
    for node in nodes:
        names.update(_uses(node))
    return names


def _defined(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in nodes:
        names.update(o for o in node.output if o)
    return names


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a ``Constant`` node as a tensor (``None`` for sparse or string values)."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return helper.make_tensor("", onnx.TensorProto.FLOAT, [], [attr.f])
        if attr.name == "value_floats":
            return helper.make_tensor("", onnx.TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
        if attr.name == "value_int":
            return helper.make_tensor("", onnx.TensorProto.INT64, [], [attr.i])
        if attr.name == "value_ints":
            return helper.make_tensor("", onnx.TensorProto.INT64, [len(attr.ints)], list(attr.ints))
    return None


def _is_default(node: onnx.NodeProto) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    return 1


class _Names:
    """Every name in the model, to hand out fresh ones deterministically."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken: set[str] = set()
        self._add_graph(model.graph)

    def _add_graph(self, graph: onnx.GraphProto) -> None:
        for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
            self.taken.update(v.name for v in coll)
        for node in graph.node:
            self.taken.add(node.name)
            self.taken.update(node.input)
            self.taken.update(node.output)
            for sub in subgraphs(node):
                self._add_graph(sub)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


# --------------------------------------------------------------------------- the index
class _Index:
    """Producers, consumers and constants of one graph's current node list; answers readers."""

    def __init__(
        self,
        nodes: list[onnx.NodeProto],
        graph: onnx.GraphProto,
        outer: dict[str, onnx.TensorProto],
        state: _State,
    ) -> None:
        self.nodes = nodes
        self.opset = state.opset
        self._shapes = state.shapes
        self.inputs = {i.name for i in graph.input}
        self.output_set = {o.name for o in graph.output}
        self.constants: dict[str, onnx.TensorProto] = {k: v for k, v in outer.items() if k not in self.inputs}
        self.overridable: set[str] = set()  # initializers that are also graph inputs
        for init in graph.initializer:
            if init.name not in self.inputs:
                self.constants[init.name] = init
            else:
                self.overridable.add(init.name)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in nodes:
            for name in _uses(node):
                self.consumers.setdefault(name, []).append(node)
            for out in node.output:
                if out:
                    self.producer[out] = node
            if node.op_type == "Constant" and _is_default(node) and node.output:
                value = _constant_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
        self._linear: dict[int, LinearOp | None] = {}

    # Env protocol for readers
    def tensor(self, name: str) -> onnx.TensorProto | str:
        for _ in range(64):  # follow Identity of a constant (exporters emit those)
            found = self.constants.get(name)
            if found is not None:
                return found
            if name in self.overridable:
                return "an initializer listed as a graph input, so it may be overridden at run time"
            if name in self.inputs:
                return "a graph input"
            producer = self.producer.get(name)
            if producer is None:
                return "not a constant of this graph"
            if producer.op_type in _FOLDABLE and _is_default(producer):
                folded = self._fold(producer, name)
                if folded is not None:
                    return folded
            if producer.op_type != "Identity" or not _is_default(producer):
                quantized = (
                    " (quantized: convfuse merges float weights)"
                    if producer.op_type == "DequantizeLinear"
                    else ""
                )
                return f"computed at run time by {producer.op_type} node {label(producer)!r}{quantized}"
            name = producer.input[0]
        return "behind too many Identity nodes"

    def _fold(self, node: onnx.NodeProto, name: str, depth: int = 0) -> onnx.TensorProto | None:
        """The value of a small shape computation on constants (what exporters emit for
        ``F.pad``'s pads), run by ONNX's reference evaluator; None when an input is not constant."""
        if depth > 32 or not node.output or name not in node.output:
            return None
        inputs = []
        for i in node.input:
            if not i:
                inputs.append(None)
                continue
            found = self.constants.get(i)
            if found is None:
                producer = self.producer.get(i)
                if (
                    producer is None
                    or producer.op_type not in _FOLDABLE
                    or i in self.inputs
                    or i in self.overridable
                ):
                    return None
                found = self._fold(producer, i, depth + 1)
            if found is None or math.prod(found.dims) > _SMALL_CONSTANT:
                return None
            inputs.append(found)
        from onnx.reference import ReferenceEvaluator

        names = [f"in{k}" if t is not None else "" for k, t in enumerate(inputs)]
        copy = helper.make_node(node.op_type, names, list(node.output), domain=node.domain)
        copy.attribute.extend(node.attribute)
        graph = helper.make_graph(
            [copy], "fold", [], [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
            [numpy_helper.from_array(numpy_helper.to_array(t), n) for t, n in zip(inputs, names) if t is not None],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        try:
            outs = ReferenceEvaluator(model).run(None, {})
        except Exception:  # noqa: BLE001 - not foldable here: the node stays a run-time value
            return None
        for out, value in zip(node.output, outs):
            self.constants[out] = numpy_helper.from_array(value, out)
        return self.constants.get(name)

    def shape(self, name: str) -> Dims | None:
        entry = self._shapes.get(name)
        dims = None if entry is None else entry[1]
        source = self.shape_source(name)
        if source is not None and (dims is None or None in dims):
            return self.shape(source)  # Reshape(v, Shape(t)): t's shape, symbolic dims included
        return dims

    def shape_source(self, name: str) -> str | None:
        """``t`` when ``name`` is the output of ``Reshape(v, Shape(t))`` (``reshape_as(t)``
        exported with symbolic dims), whose shape is ``t``'s by definition."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Reshape" or len(node.input) < 2 or not _is_default(node):
            return None
        shape = self.producer.get(node.input[1])
        if shape is None or shape.op_type != "Shape" or not _is_default(shape) or shape.attribute:
            return None
        return shape.input[0]

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def linear(self, node: onnx.NodeProto) -> LinearOp | None:
        key = id(node)
        if key not in self._linear:
            self._linear[key] = read_linear(node, self)
        return self._linear[key]

    def is_constant(self, name: str) -> bool:
        return not isinstance(self.tensor(name), str)


# --------------------------------------------------------------------------- state
@dataclass
class _State:
    judge: Judge
    shapes: Shapes
    opset: int
    report: Report
    say: Progress
    names: _Names
    subgraphs: int = 0
    merges: int = 0
    created: set[str] = field(default_factory=set)  # initializers written by merges


@dataclass
class _Rewrite:
    """Node replacements collected by a rule in one round: applied together, at the end."""

    replace: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)  # anchor id -> new nodes
    removed: set[int] = field(default_factory=set)

    def claims(self, nodes: Sequence[onnx.NodeProto]) -> bool:
        return any(id(n) in self.removed for n in nodes)

    def apply(self, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto] | None:
        if not self.removed:
            return None
        out: list[onnx.NodeProto] = []
        for node in nodes:
            if id(node) in self.replace:
                out.extend(self.replace[id(node)])
            elif id(node) not in self.removed:
                out.append(node)
        return out


_Declines = list[tuple[list[str], Decline]]  # node labels and why they were kept
Rule = Callable[[_Index, onnx.GraphProto, _State, _Declines], "list[onnx.NodeProto] | None"]


# --------------------------------------------------------------------------- rule 1: Identity
def _rename_in_subgraph(graph: onnx.GraphProto, rename: Callable[[str], str]) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name:
                node.input[k] = rename(name)
        for sub in subgraphs(node):
            _rename_in_subgraph(sub, rename)
    for out in graph.output:
        out.name = rename(out.name)


def drop_identities(
    index: _Index, graph: onnx.GraphProto, state: _State, declines: _Declines
) -> list[onnx.NodeProto] | None:
    """``y = Identity(x)``: consumers read ``x``. If ``y`` is a graph output, ``x``'s producer
    writes ``y`` instead (only when ``x`` is produced here and is not itself an input or output)."""
    rename: dict[str, str] = {}

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    outputs = set(index.output_set)
    out_rename: dict[int, dict[str, str]] = {}
    removed: set[int] = set()
    for node in index.nodes:
        if (
            node.op_type != "Identity"
            or not _is_default(node)
            or len(node.input) != 1
            or len(node.output) != 1
        ):
            continue
        x, y = resolve(node.input[0]), node.output[0]
        if y not in outputs:
            rename[y] = x
            removed.add(id(node))
            state.report.merged(
                "identity", [label(node)], x, _ZERO, _ZERO, f"removed; its readers now read {x!r}"
            )
            continue
        producer = index.producer.get(x)
        if (
            producer is None
            or id(producer) in removed
            or x in outputs
            or x in index.inputs
            or x in index.constants
        ):
            why = "a graph input or constant" if producer is None else "also a graph output"
            declines.append(
                (
                    [label(node)],
                    Decline(Reason.GRAPH_OUTPUT, f"{y!r} is a graph output and its input {x!r} is {why}"),
                )
            )
            continue
        rename[x] = y
        out_rename.setdefault(id(producer), {})[x] = y
        removed.add(id(node))
        state.report.merged(
            "identity",
            [label(node)],
            label(producer),
            _ZERO,
            _ZERO,
            f"removed; {label(producer)} now writes {y!r}",
        )
    if not removed:
        return None
    kept: list[onnx.NodeProto] = []
    for node in index.nodes:
        if id(node) in removed:
            continue
        for k, name in enumerate(node.input):
            if name:
                node.input[k] = resolve(name)
        for k, name in enumerate(node.output):
            node.output[k] = out_rename.get(id(node), {}).get(name, name)
        for sub in subgraphs(node):
            _rename_in_subgraph(sub, resolve)
        kept.append(node)
    return kept


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
    shapes = {
        t: dims
        for t in {n.output for n in nodes} | {i for n in nodes for i in n.inputs}
        if (dims := index.shape(t)) is not None
    }
    return LinearGraph(nodes, external, set(index.output_set), shapes, state.names.fresh, ring_nodes=True)


def _elem_type(merge: Merge) -> int | None:
    for node in merge.nodes:
        if node.kind.is_anchor and node.origin[1] is not None:
            return node.origin[1].elem_type
    return None


def merge_regions(
    index: _Index, graph: onnx.GraphProto, state: _State, declines: _Declines
) -> list[onnx.NodeProto] | None:
    """Rule 2: every linear region planned by :func:`convfuse.planner.plan`, written back as Conv
    nodes (and the sums left with fewer terms) - the ONNX exporter."""
    ir = _linear_graph(index, state)
    if not any(n.kind.is_anchor for n in ir.nodes):
        return None
    elem = next((n.origin[1].elem_type for n in ir.nodes if n.kind.is_anchor and n.origin[1].elem_type), None)
    result = plan(ir, state.judge, FLOAT_TYPES.get(elem or 0, None))
    declines.extend(result.declines)
    position = {id(n): k for k, n in enumerate(index.nodes)}
    built: dict[int, tuple[list[onnx.NodeProto], list[NewTensor]]] = {}
    failed: set[str] = set()
    for y in _stale_shape_reads(index, result.merges):
        merge = next(m for m in result.merges if m.y == y)
        declines.append(
            (
                list(merge.sources),
                Decline(
                    Reason.SHARED_TENSOR,
                    "a Shape node reads a tensor inside this merge for a Reshape it keeps",
                ),
            )
        )
        failed.add(y)
    for merge in result.merges:
        first = next(n for n in merge.nodes if n.kind.is_anchor)
        name = first.origin[0].name or state.names.fresh(f"Conv_{merge.y}")
        elem_type = _elem_type(merge)
        elem_type = elem_type or onnx.TensorProto.FLOAT
        if isinstance(merge.spec, ConvTransposeSpec):  # a merged transposed conv: one ConvTranspose
            written = transpose_node(
                merge.spec, name=name, x=merge.x, y=merge.y, elem_type=elem_type, fresh=state.names.fresh
            )
            made = written if isinstance(written, Decline) else ([written[0]], new_tensors(written[1]))
        elif merge.linear:
            rank2 = len(index.shape(merge.x) or ()) == 2
            regroup = _regroup_back(index, merge, state.names.fresh)
            made = (
                regroup
                if isinstance(regroup, Decline)
                else linear_nodes(
                    merge.spec,
                    name=name,
                    x=merge.x,
                    y=merge.y if regroup is None else regroup[0].input[0],
                    elem_type=elem_type,
                    fresh=state.names.fresh,
                    rank2=rank2,
                )
            )
            if regroup is not None and not isinstance(made, Decline):
                made = ([*made[0], regroup[0]], [*made[1], *regroup[1]])
        else:
            conv_out = state.names.fresh(f"{merge.y}/conv") if merge.ring is not None else merge.y
            made = conv_node(
                merge.spec, name=name, x=merge.x, y=conv_out, elem_type=elem_type, fresh=state.names.fresh
            )
            made = made if isinstance(made, Decline) else ([made[0]], made[1])
            if merge.ring is not None and not isinstance(made, Decline):  # case 2: Conv + Add(ring)
                extra = ring_nodes(
                    merge.ring,
                    name=name,
                    x=merge.x,
                    conv_out=conv_out,
                    y=merge.y,
                    elem_type=elem_type,
                    opset=state.opset,
                    fresh=state.names.fresh,
                )
                made = extra if isinstance(extra, Decline) else (made[0] + extra[0], made[1] + extra[1])
        if isinstance(made, Decline):
            declines.append((list(merge.sources), made))
            failed.add(merge.y)
            continue
        built[id(merge)] = made
    resums = []
    for resum in result.resums:
        terms = {t for t, _ in resum.terms}
        if terms & failed or state.opset < 7 or any(c not in (1.0, -1.0) for _, c in resum.terms):
            if state.opset < 7:
                declines.append(
                    (
                        [n.name for n in resum.nodes],
                        Decline(
                            Reason.UNSUPPORTED, "opset < 7: rebuilding a partial sum needs broadcasting Add"
                        ),
                    )
                )
            failed |= terms
            continue
        resums.append(resum)
    rewrite = _Rewrite()
    for merge in result.merges:
        if id(merge) not in built or merge.y in failed:
            continue
        new_nodes, initializers = built[id(merge)]
        node = new_nodes[0]
        last = max((n.origin[0] for n in merge.nodes), key=lambda n: position[id(n)])
        for tensor in initializers:
            tensor.write(graph.initializer)
        state.created.update(t.name for t in initializers)
        mark_merged(node, merge.kind, [n.origin[0] for n in merge.nodes])
        rewrite.replace.setdefault(id(last), []).extend(new_nodes)
        rewrite.removed.update(id(n.origin[0]) for n in merge.nodes)
        state.merges += 1
        state.report.merged(
            merge.kind, list(merge.sources), node.name, merge.before, merge.after, merge.note, merge.timing
        )
    for resum in resums:
        roots = [n.origin[0] for n in resum.nodes]
        root = max(roots, key=lambda n: position[id(n)])
        rewrite.replace.setdefault(id(root), []).extend(_sum_nodes(resum, root, state))
        rewrite.removed.update(id(n) for n in roots)
    return rewrite.apply(index.nodes)


def _regroup_back(
    index: _Index, merge: Merge, fresh: Callable[[str], str]
) -> tuple[onnx.NodeProto, list[NewTensor]] | Decline | None:
    """A merged Linear keeps the leading dims of its input; when the reshapes it replaces end
    with other leading dims (``bn(linear(x).flatten(0, 1))`` read as it is), the node that gives
    them back: ``Flatten`` to a ``[N, C]`` output, else ``Reshape`` to the output's static shape.
    None when nothing is needed; a decline when the output's shape is not known."""
    if not any(n.layout == REGROUP for n in merge.nodes):
        return None
    producer = {n.output: n for n in merge.nodes}
    t = index.shape_source(merge.y)  # Reshape(v, Shape(t)): y has t's shape
    while t in producer and producer[t].kind.is_unary and producer[t].layout != REGROUP:
        t = producer[t].inputs[0]  # Linear, BN, affine keep the leading dims
    if t == merge.x:
        return None
    before, after = index.shape(merge.x), index.shape(merge.y)
    if before is not None and after is not None and before[:-1] == after[:-1]:
        if sum(d is None for d in before[:-1]) <= 1:  # the leading products agree: one unknown is equal
            return None
    mid = fresh(f"{merge.y}/linear")
    name = fresh(f"{merge.y}/regroup")
    if before is not None and after is not None and len(after) == 2:
        return helper.make_node("Flatten", [mid], [merge.y], name=name, axis=len(before) - 1), []
    if after is not None and None not in after:
        shape = NewTensor(fresh(f"{merge.y}/shape"), np.array(after, dtype=np.int64), onnx.TensorProto.INT64)
        return helper.make_node("Reshape", [mid, shape.name], [merge.y], name=name), [shape]
    return Decline(
        Reason.RANK_MISMATCH,
        f"the merged Linear layer keeps the leading dims of {merge.x!r}, which the reshapes it replaces "
        f"regroup, and the shape of {merge.y!r} is not known",
    )


def _sum_nodes(resum: Resum, root: onnx.NodeProto, state: _State) -> list[onnx.NodeProto]:
    """``y = sum c_i t_i`` with ``c_i`` in {1, -1}: one Sum, or a chain of Add/Sub (root's name last)."""
    terms = sorted(resum.terms, key=lambda tc: tc[1] < 0)  # a positive term first
    if root.op_type == "Sum" and all(c == 1 for _, c in terms) and len(terms) > 1:
        return [helper.make_node("Sum", [t for t, _ in terms], [resum.y], name=root.name)]
    out: list[onnx.NodeProto] = []
    acc = terms[0][0]
    if terms[0][1] < 0:
        neg = state.names.fresh(f"{resum.y}/neg")
        out.append(helper.make_node("Neg", [acc], [neg], name=state.names.fresh(f"{root.name or 'Neg'}/neg")))
        acc = neg
    if len(terms) == 1:
        out.append(helper.make_node("Identity", [acc], [resum.y], name=root.name))
        return out
    for k, (term, coef) in enumerate(terms[1:], start=1):
        last = k == len(terms) - 1
        y = resum.y if last else state.names.fresh(f"{resum.y}/partial{k}")
        name = root.name if last else state.names.fresh(f"{root.name or 'Add'}/partial{k}")
        out.append(helper.make_node("Add" if coef > 0 else "Sub", [acc, term], [y], name=name))
        acc = y
    return out


#: The rewrite rules, in the order each round applies them.
RULES: tuple[Rule, ...] = (drop_identities, merge_regions)


# --------------------------------------------------------------------------- per graph
def _visible_constants(
    graph: onnx.GraphProto, nodes: list[onnx.NodeProto], outer: dict[str, onnx.TensorProto], state: _State
) -> dict[str, onnx.TensorProto]:
    return dict(_Index(nodes, graph, outer, state).constants)


def _fuse_graph(
    graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto], state: _State, where: str
) -> None:
    nodes: list[onnx.NodeProto] = []
    for original in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(original)
        nodes.append(copy)
    referenced_before = _referenced(graph, nodes)
    defined_before = _defined(graph, nodes)
    visible = _visible_constants(graph, nodes, outer, state)
    for node in nodes:
        for sub in subgraphs(node):
            state.subgraphs += 1
            _fuse_graph(sub, visible, state, f"subgraph {sub.name or '?'} of {label(node)}")
    declines: _Declines = []
    # Identity removal until nothing changes (the last round is reported after the loop)
    for round_no in range(1, _MAX_ROUNDS + 1):  # noqa: B007
        declines = []
        rewritten = drop_identities(_Index(nodes, graph, outer, state), graph, state, declines)
        if rewritten is None:
            break
        nodes = rewritten
    else:
        state.report.notes.append(f"{where}: stopped after {_MAX_ROUNDS} rounds of rewriting")
    for rule in RULES[1:]:  # then one plan of every linear region
        rewritten = rule(_Index(nodes, graph, outer, state), graph, state, declines)
        if rewritten is not None:
            nodes = rewritten
    state.say(f"{where}: round {round_no}, {state.merges} merges so far")
    seen: set[tuple[tuple[str, ...], str, str]] = set()
    unread = [([label(n) for n in members], decline) for members, decline in unread_nodes(nodes)]
    for sources, decline in [*declines, *unread]:
        key = (tuple(sources), decline.reason.value, decline.message)
        if key not in seen:
            seen.add(key)
            state.report.declined(list(sources), decline)
    nodes = _cleanup(graph, nodes, referenced_before | state.created, defined_before)
    del graph.node[:]
    graph.node.extend(nodes)


def _cleanup(
    graph: onnx.GraphProto, nodes: list[onnx.NodeProto], referenced_before: set[str], defined_before: set[str]
) -> list[onnx.NodeProto]:
    """Drop what the merges orphaned: Constant nodes, initializers, value_info of removed tensors.

    Only names that were in use before (or written by a merge) are dropped; whatever the input
    already left dangling is left as it was.
    """
    referenced = _referenced(graph, nodes)
    while True:  # a removed node may leave the constants it read unused
        kept = [
            n
            for n in nodes
            if not (
                n.op_type in _FOLDABLE
                and _is_default(n)
                and not any(True for _ in subgraphs(n))
                and all(o not in referenced and o in referenced_before for o in n.output)
            )
        ]
        if len(kept) == len(nodes):
            break
        nodes = kept
        referenced = _referenced(graph, nodes)
    inputs = {i.name for i in graph.input}
    referenced = _referenced(graph, nodes)
    for k in reversed(range(len(graph.initializer))):
        name = graph.initializer[k].name
        if name not in referenced and name not in inputs and name in referenced_before:
            del graph.initializer[k]
    defined = _defined(graph, nodes)
    for k in reversed(range(len(graph.value_info))):
        name = graph.value_info[k].name
        if name not in defined and name in defined_before:
            del graph.value_info[k]
    return nodes


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


# --------------------------------------------------------------------------- public API
def fuse_onnx(
    model: onnx.ModelProto | LoadedModel | str | os.PathLike[str],
    policy: Policy | str = Policy.FLOPS,
    *,
    progress: Progress | None = None,
    device: str = "cpu",
    latency_budget: float = DEFAULT_BUDGET,
    timer: Timer | None = None,
    inplace: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Merge every linear run of ``model`` into single convolutions; return a new model and a report.

    ``model`` is a ``ModelProto`` (left unchanged unless ``inplace``), a path (external data
    beside it is read), or what :func:`~convfuse.frontends.onnx.io.read_model` returned (already
    checked: the ONNX checker serialises every weight, so it runs once per model). ``policy``: ``"flops"`` merges only what does not increase MACs or
    parameters, ``"always"`` every exact merge, ``"latency"`` the merges ONNX Runtime measures
    faster on ``device`` (``"cpu"`` or ``"cuda"``), timing for at most ``latency_budget`` seconds
    in all (then the flops rule); ``timer`` replaces the ONNX Runtime timer
    (:mod:`convfuse.latency`). ``progress`` receives one-line status messages (for large models
    and timings). ``inplace=True`` fuses the given ModelProto itself and returns it, saving a
    copy of every weight (for models of gigabytes whose original is not needed).
    Raises :class:`~convfuse.errors.InvalidModelError` for input that is not a valid model (the
    message names the file), :class:`~convfuse.errors.InvalidOptionError` for an unknown policy
    and :class:`~convfuse.errors.DeviceUnavailableError` for ``device="cuda"`` without CUDA.
    """
    if isinstance(model, (str, os.PathLike)):
        source = load_model(model)
        inplace = True  # nobody else holds it
    elif isinstance(model, LoadedModel):
        source = model.model  # read_model checked it
    elif isinstance(model, onnx.ModelProto):
        check_model(model)
        source = model
    else:
        raise InvalidModelError(f"fuse_onnx needs an onnx.ModelProto or a path, got {type(model).__name__}")
    try:
        chosen = Policy.parse(policy)
    except ValueError as exc:
        raise InvalidOptionError(str(exc)) from None
    say: Progress = progress or (lambda message: None)
    judge = judge_for(chosen, device, latency_budget, timer, progress=say)  # the ORT timer under latency
    if inplace:
        fused = source
    else:
        fused = onnx.ModelProto()
        fused.CopyFrom(source)
    started = time.monotonic()
    say("inferring shapes")
    shapes, note = infer_shapes(fused)
    report = Report()
    report.before = model_stats(fused, shapes)
    report.positions = {label(node): i for i, node in enumerate(fused.graph.node)}
    if prepare(fused, report):  # fold constants, read bias-filled borders (onnx_prepass)
        shapes, note = infer_shapes(fused)
    state = _State(judge, shapes, _opset(fused), report, say, _Names(fused))
    _fuse_graph(fused.graph, {}, state, "main graph")
    say("computing statistics of the result")
    # Merged convs write the tensors they replace: the shapes inferred before fusing cover them,
    # so shape inference runs once per pass (again only if a Conv output is new to them).
    report.after = model_stats(
        fused, shapes if _knows_conv_outputs(fused, shapes) else infer_shapes(fused)[0]
    )
    report.timings["fuse"] = time.monotonic() - started
    _summarise(report)
    if note:
        report.notes.append(note)
    if state.subgraphs:
        report.notes.append(f"walked {state.subgraphs} subgraph(s) (If/Loop/Scan bodies)")
    inputs = {i.name for i in fused.graph.input}
    overridable = sum(1 for t in fused.graph.initializer if t.name in inputs)
    if overridable and any(d.reason is Reason.NON_CONSTANT for d in report.declines):
        report.notes.append(
            f"{overridable} initializer(s) are also graph inputs, so they may be overridden at run time and "
            "are not merged; export without them as inputs (torch: keep_initializers_as_inputs=False)"
        )
    if fused.functions:
        report.notes.append(f"{len(fused.functions)} model-local function(s) were not walked")
    if report.before.macs is not None:
        counted = "Conv and ConvTranspose" if report.before.op_counts.get("ConvTranspose") else "Conv"
        report.notes.append(f"MACs: multiply-accumulates of {counted} nodes per sample")
    report.notes.extend(judge.notes())
    return fused, report
