"""The ONNX front end: find linear runs in a graph, merge each with the shared algebra, write back.

Rules (:data:`RULES`), applied to every graph, subgraphs first, until a round changes nothing:

1. **Identity.** ``y = Identity(x)``: consumers read ``x`` instead. When ``y`` is a graph output,
   ``x``'s producer writes ``y`` directly (graph outputs keep their names), if it can.
2. **Chain.** ``x -> L1 -> L2 -> ... -> Ln`` where each ``Li`` is a :class:`LinearOp` (Conv,
   inference BatchNormalization, Mul/Add/Sub/Div by a per-channel constant, zero Pad,
   AveragePool) and every intermediate tensor has one consumer and is not a graph output. The
   run is split and merged by :func:`convfuse.plan.plan_chain` (padding cases and cost policy
   included); each merged part becomes one Conv.
3. **Sum.** An ``Add``/``Sum`` tree whose terms are linear branches of one tensor ``x`` (a branch
   may be ``x`` itself): merged by :func:`convfuse.plan.plan_sum` into one Conv; terms from other
   tensors stay in a smaller sum.

A tensor read by more than one node, or that is a graph output, is never merged away. Declines
reported are those of the last round (the one where nothing changed), so a decline that a later
merge made moot is not reported. Merged nodes take the name of the first convolution they
replace; untouched nodes are left as they are.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

import onnx
import torch
from onnx import helper

from ..algebra import Cost
from ..decline import Decline, Reason
from ..errors import InvalidModelError, InvalidOptionError
from ..latency import DEFAULT_BUDGET, LatencyMeter, Timer
from ..plan import SumPlan, plan_chain, plan_sum
from ..policy import Judge, Policy
from ..report import ModelStats, Report
from ..spec import ConvSpec
from .onnx_io import check_model, load_model
from .onnx_prepass import prepare
from .onnx_nodes import (
    FLOAT_TYPES,
    Dims,
    LinearOp,
    conv_macs,
    conv_node,
    label,
    mark_merged,
    read_linear,
    unread_nodes,
)

__all__ = ["REPORTED_OPS", "RULES", "fuse_onnx", "infer_shapes", "model_stats"]

#: Op types always shown in the before/after summary (others only when their count changes).
REPORTED_OPS = ("Conv", "BatchNormalization", "Add")

#: Initializers with at most this many elements keep their data for shape inference.
_SMALL_CONSTANT = 1024
#: Safety stop for the rewrite loop (each round removes at least one node or sum term).
_MAX_ROUNDS = 100

_ZERO = Cost(0, 0)

Progress = Callable[[str], None]
Shapes = dict[str, tuple[int, Dims | None]]
_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------- graph helpers
def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _outer_refs(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` (a subgraph) reads from enclosing scopes, in order of first use."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    refs: dict[str, None] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                refs[name] = None
        for sub in _subgraphs(node):
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
    for sub in _subgraphs(node):
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
            for sub in _subgraphs(node):
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
            if producer.op_type != "Identity" or not _is_default(producer):
                quantized = " (quantized: convfuse merges float weights)" if producer.op_type == "DequantizeLinear" else ""
                return f"computed at run time by {producer.op_type} node {label(producer)!r}{quantized}"
            name = producer.input[0]
        return "behind too many Identity nodes"

    def shape(self, name: str) -> Dims | None:
        entry = self._shapes.get(name)
        return None if entry is None else entry[1]

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


_Declines = list[tuple[list[onnx.NodeProto], Decline]]
Rule = Callable[[_Index, onnx.GraphProto, _State, _Declines], "list[onnx.NodeProto] | None"]


# --------------------------------------------------------------------------- rule 1: Identity
def _rename_in_subgraph(graph: onnx.GraphProto, rename: Callable[[str], str]) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name:
                node.input[k] = rename(name)
        for sub in _subgraphs(node):
            _rename_in_subgraph(sub, rename)
    for out in graph.output:
        out.name = rename(out.name)


def drop_identities(index: _Index, graph: onnx.GraphProto, state: _State, declines: _Declines) -> list[onnx.NodeProto] | None:
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
        if node.op_type != "Identity" or not _is_default(node) or len(node.input) != 1 or len(node.output) != 1:
            continue
        x, y = resolve(node.input[0]), node.output[0]
        if y not in outputs:
            rename[y] = x
            removed.add(id(node))
            state.report.merged("identity", [label(node)], x, _ZERO, _ZERO, f"removed; its readers now read {x!r}")
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
                ([node], Decline(Reason.GRAPH_OUTPUT, f"{y!r} is a graph output and its input {x!r} is {why}"))
            )
            continue
        rename[x] = y
        out_rename.setdefault(id(producer), {})[x] = y
        removed.add(id(node))
        state.report.merged(
            "identity", [label(node)], label(producer), _ZERO, _ZERO, f"removed; {label(producer)} now writes {y!r}"
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
        for sub in _subgraphs(node):
            _rename_in_subgraph(sub, resolve)
        kept.append(node)
    return kept


# --------------------------------------------------------------------------- rule 2: chains
def _chain_note(ops: Sequence[LinearOp], specs: Sequence[ConvSpec]) -> str:
    notes = []
    if any(op.kind == "pad" for op in ops):
        notes.append("zero Pad folded into the conv padding")
    for k in range(1, len(ops)):
        prefix = specs[:k]
        if (
            specs[k].is_padded
            and all(s.is_pointwise and not s.is_padded for s in prefix)
            and any(op.kind != "pad" for op in ops[:k])
        ):
            notes.append(
                f"padding case 1: the layers before {label(ops[k].node)} are pointwise with zero bias, so "
                "its zero padding moves to the input"
            )
    return "; ".join(notes)


def _dims(state: _State, name: str) -> Dims | None:
    """Inferred dims of tensor ``name`` (``None`` entries symbolic), or ``None`` if unknown."""
    entry = state.shapes.get(name)
    return None if entry is None else entry[1]


def _input_channels(run: Sequence[LinearOp]) -> list[int]:
    """Input channels of each op in a run: set by the convolutions (other ops keep the count)."""
    current = next(op.in_channels for op in run if op.is_conv)
    channels: list[int] = []
    for op in run:
        assert current is not None
        channels.append(current)
        if op.is_conv:
            current = op.out_channels
    return channels


_T = TypeVar("_T")


def _split(items: Sequence[tuple[LinearOp, _T | Decline]], declines: _Declines) -> list[list[tuple[LinearOp, _T]]]:
    """Runs between unusable ops (value a Decline), each reported with its neighbours; only runs
    of two or more ops holding a conv are returned."""
    runs: list[list[tuple[LinearOp, _T]]] = [[]]
    for k, (op, value) in enumerate(items):
        if isinstance(value, Decline):
            around = [items[j][0].node for j in (k - 1, k, k + 1) if 0 <= j < len(items)]
            declines.append((around, value))
            runs.append([])
        else:
            runs[-1].append((op, value))
    return [r for r in runs if len(r) >= 2 and any(op.is_conv for op, _ in r)]


def merge_chains(index: _Index, graph: onnx.GraphProto, state: _State, declines: _Declines) -> list[onnx.NodeProto] | None:
    """Rule 2: every maximal chain of single-consumer linear ops holding a conv, split and merged."""
    ops: dict[int, LinearOp] = {}
    for node in index.nodes:
        op = index.linear(node)
        if op is not None:
            ops[id(node)] = op
    following: dict[int, LinearOp] = {}
    for node in index.nodes:
        a = ops.get(id(node))
        if a is None:
            continue
        users = index.users(a.y)
        followers = [ops[id(u)] for u in users if id(u) in ops and ops[id(u)].x == a.y]
        if a.y in index.output_set or len(users) > 1:
            reason = Reason.GRAPH_OUTPUT if a.y in index.output_set else Reason.SHARED_TENSOR
            why = "is a graph output" if reason is Reason.GRAPH_OUTPUT else f"is read by {len(users)} nodes"
            seen: set[int] = set()
            for b in followers:
                if id(b.node) in seen or not (a.is_conv or b.is_conv):
                    continue
                seen.add(id(b.node))
                declines.append(
                    ([a.node, b.node], Decline(reason, f"{a.y!r} {why}, so {label(a.node)} is kept to produce it"))
                )
            continue
        if followers:
            following[id(node)] = followers[0]
    has_prev = {id(b.node) for b in following.values()}
    rewrite = _Rewrite()
    for node in index.nodes:
        head = ops.get(id(node))
        if head is None or id(node) in has_prev:
            continue
        chain = [head]
        while id(chain[-1].node) in following:
            chain.append(following[id(chain[-1].node)])
        if len(chain) < 2 or not any(op.is_conv for op in chain):
            continue
        usable = _split([(op, op.refused if op.refused is not None else op) for op in chain], declines)
        for run in usable:
            _merge_run([op for op, _ in run], graph, state, declines, rewrite)
    return rewrite.apply(index.nodes)


def _merge_run(
    run: list[LinearOp], graph: onnx.GraphProto, state: _State, declines: _Declines, rewrite: _Rewrite
) -> None:
    ndim = next(op.ndim for op in run if op.is_conv)
    assert ndim is not None
    channels = _input_channels(run)
    resolved = [(op, op.spec(ndim, c)) for op, c in zip(run, channels)]
    for part in _split(resolved, declines):
        part_ops = [op for op, _ in part]
        specs = [spec for _, spec in part]
        elem = next(op.elem_type for op in part_ops if op.is_conv)
        plan = plan_chain(
            specs,
            [op.is_conv for op in part_ops],
            state.judge,
            input_shape=_dims(state, part_ops[0].x),
            dtype=FLOAT_TYPES.get(elem or 0, torch.float32),
        )
        for start, stop, decline in plan.kept:
            declines.append(([op.node for op in part_ops[start:stop]], decline))
        for seg in plan.segments:
            seg_ops = part_ops[seg.start : seg.stop]
            first_conv = next(op for op in seg_ops if op.is_conv)
            assert first_conv.elem_type is not None
            name = first_conv.node.name or state.names.fresh(f"Conv_{seg_ops[-1].y}")
            built = conv_node(
                seg.spec, name=name, x=seg_ops[0].x, y=seg_ops[-1].y, elem_type=first_conv.elem_type, fresh=state.names.fresh
            )
            if isinstance(built, Decline):
                declines.append(([op.node for op in seg_ops], built))
                continue
            new_node, initializers = built
            kind = "+".join(op.kind for op in seg_ops)
            mark_merged(new_node, kind, [op.node for op in seg_ops])
            graph.initializer.extend(initializers)
            state.created.update(t.name for t in initializers)
            rewrite.replace[id(seg_ops[-1].node)] = [new_node]
            rewrite.removed.update(id(op.node) for op in seg_ops)
            state.merges += 1
            note = "; ".join(n for n in (_chain_note(seg_ops, specs[seg.start : seg.stop]), seg.note) if n)
            state.report.merged(
                kind,
                [label(op.node) for op in seg_ops],
                name,
                seg.before,
                seg.after,
                note,
                seg.timing,
            )


# --------------------------------------------------------------------------- rule 3: sums
def _is_sum(node: onnx.NodeProto, index: _Index) -> bool:
    if not _is_default(node) or len(node.output) != 1:
        return False
    if node.op_type == "Add" and len(node.input) == 2 or node.op_type == "Sum" and len(node.input) >= 2:
        return all(n and not index.is_constant(n) for n in node.input)
    return False


def _flatten(root: onnx.NodeProto, index: _Index, sums: set[int]) -> tuple[list[onnx.NodeProto], list[str]]:
    """The Add/Sum nodes of the tree under ``root`` and its terms, in input order."""
    tree: list[onnx.NodeProto] = []
    terms: list[str] = []
    stack: list[onnx.NodeProto | str] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            terms.append(item)
            continue
        tree.append(item)
        pending: list[onnx.NodeProto | str] = []
        for name in item.input:
            producer = index.producer.get(name)
            inner = (
                producer is not None
                and id(producer) in sums
                and name not in index.output_set
                and len(index.users(name)) == 1
            )
            pending.append(producer if inner and producer is not None else name)
        stack.extend(reversed(pending))
    return tree, terms


def _branch(term: str, index: _Index, ops: dict[int, LinearOp]) -> tuple[str, list[LinearOp]]:
    """Walk back from a sum term through single-consumer linear ops: (source tensor, ops in order)."""
    chain: list[LinearOp] = []
    current = term
    while current not in index.output_set and len(index.users(current)) == 1:
        producer = index.producer.get(current)
        op = ops.get(id(producer)) if producer is not None else None
        if op is None or op.y != current:
            break
        chain.append(op)
        current = op.x
    chain.reverse()
    return current, chain


@dataclass
class _GroupPlan:
    source: str
    members: list[int]  # term indices merged
    chains: list[list[LinearOp]]
    plan: SumPlan


def _plan_group(
    source: str,
    members: list[int],
    chains: list[list[LinearOp]],
    root: onnx.NodeProto,
    state: _State,
    declines: _Declines,
) -> _GroupPlan | None:
    # The source's channels: the input of the first conv of any branch (earlier ops keep C).
    firsts = [next(op for op in chain if op.is_conv) for chain in chains if any(o.is_conv for o in chain)]
    known = [op for op in firsts if op.refused is None]
    if not known:
        for chain in chains:
            refused = next((op.refused for op in chain if op.refused is not None), None)
            if refused is not None:
                declines.append(([o.node for o in chain] + [root], refused))
        return None
    ndim, c_in = known[0].ndim, known[0].in_channels
    assert ndim is not None and c_in is not None
    usable: list[tuple[int, list[LinearOp], list[ConvSpec]]] = []
    for member, chain in zip(members, chains):
        specs: list[ConvSpec] = []
        current = c_in
        problem: Decline | None = next((op.refused for op in chain if op.refused is not None), None)
        for op in chain if problem is None else ():
            if op.is_conv and op.in_channels != current:
                problem = Decline(
                    Reason.CHANNEL_MISMATCH, f"{label(op.node)} reads {op.in_channels} channels, branch has {current}"
                )
                break
            spec = op.spec(ndim, current)
            if isinstance(spec, Decline):
                problem = spec
                break
            specs.append(spec)
            current = spec.out_channels
        if problem is not None:
            declines.append(([op.node for op in chain] + [root], problem))
            continue
        usable.append((member, chain, specs))
    if len(usable) < 2:
        return None
    elem = known[0].elem_type
    plan = plan_sum(
        [specs for _, _, specs in usable],
        c_in,
        ndim,
        state.judge,
        input_shape=_dims(state, source),
        dtype=FLOAT_TYPES.get(elem or 0, torch.float32),
    )
    for j, decline in plan.branch_declines:
        declines.append(([op.node for op in usable[j][1]] + [root], decline))
    if plan.spec is None:
        if plan.decline is not None:
            declines.append(([op.node for _, chain, _ in usable for op in chain] + [root], plan.decline))
        return None
    used = [usable[j] for j in plan.used]
    if not any(op.is_conv for _, chain, _ in used for op in chain):
        return None
    return _GroupPlan(source, [m for m, _, _ in used], [chain for _, chain, _ in used], plan)


def merge_sums(index: _Index, graph: onnx.GraphProto, state: _State, declines: _Declines) -> list[onnx.NodeProto] | None:
    """Rule 3: Add/Sum trees of linear branches of one tensor become one Conv (plus the other terms)."""
    ops: dict[int, LinearOp] = {}  # refused ones too: a branch through one is reported, not skipped
    for node in index.nodes:
        op = index.linear(node)
        if op is not None:
            ops[id(node)] = op
    sums = [n for n in index.nodes if _is_sum(n, index)]
    sum_ids = {id(n) for n in sums}
    rewrite = _Rewrite()
    for root in sums:
        out = root.output[0]
        users = index.users(out)
        if out not in index.output_set and len(users) == 1 and id(users[0]) in sum_ids:
            continue  # an inner node: handled from its root
        tree, terms = _flatten(root, index, sum_ids)
        branches = [_branch(t, index, ops) for t in terms]
        groups: dict[str, list[int]] = {}
        for i, (source, _) in enumerate(branches):
            groups.setdefault(source, []).append(i)
        plans: list[_GroupPlan] = []
        for source, members in groups.items():
            chains = [branches[i][1] for i in members]
            if len(members) < 2 or not any(op.is_conv for chain in chains for op in chain):
                continue
            found = _plan_group(source, members, chains, root, state, declines)
            if found is not None:
                plans.append(found)
        if not plans:
            continue
        _rewrite_sum(root, tree, terms, plans, graph, state, declines, rewrite)
    return rewrite.apply(index.nodes)


def _rewrite_sum(
    root: onnx.NodeProto,
    tree: list[onnx.NodeProto],
    terms: list[str],
    plans: list[_GroupPlan],
    graph: onnx.GraphProto,
    state: _State,
    declines: _Declines,
    rewrite: _Rewrite,
) -> None:
    out = root.output[0]
    claimed = tree + [op.node for p in plans for chain in p.chains for op in chain]
    if rewrite.claims(claimed):
        return
    whole = len(plans) == 1 and len(plans[0].members) == len(terms)
    if not whole and state.opset < 7:
        declines.append(
            ([root], Decline(Reason.UNSUPPORTED, "opset < 7: rebuilding a partial sum needs broadcasting Add"))
        )
        return
    built: list[tuple[_GroupPlan, onnx.NodeProto, list[onnx.TensorProto]]] = []
    for p in plans:
        first_conv = next(op for chain in p.chains for op in chain if op.is_conv)
        assert first_conv.elem_type is not None and p.plan.spec is not None
        name = first_conv.node.name or state.names.fresh(f"Conv_{out}")
        y = out if whole else state.names.fresh(f"{out}/{name}")
        made = conv_node(p.plan.spec, name=name, x=p.source, y=y, elem_type=first_conv.elem_type, fresh=state.names.fresh)
        if isinstance(made, Decline):
            declines.append(([op.node for chain in p.chains for op in chain] + [root], made))
            if whole:
                return
            continue
        built.append((p, *made))
    if not built:
        return
    # The remaining sum keeps the terms' order (a merged group sits where its first term was)
    # and the root's op type: one Sum node for a Sum, a chain of Adds for an Add tree.
    first_of = {min(p.members): node.output[0] for p, node, _ in built}
    covered = {m for p, _, _ in built for m in p.members}
    summands = [first_of[i] if i in first_of else t for i, t in enumerate(terms) if i in first_of or i not in covered]
    new_nodes = [node for _, node, _ in built]
    if len(summands) > 1 and root.op_type == "Sum":
        new_nodes.append(helper.make_node("Sum", summands, [out], name=root.name))
    acc = summands[0]
    for k, term in enumerate(summands[1:] if root.op_type != "Sum" else [], start=1):
        last = k == len(summands) - 1
        y = out if last else state.names.fresh(f"{out}/partial{k}")
        node_name = root.name if last else state.names.fresh(f"{root.name or 'Add'}/partial{k}")
        new_nodes.append(helper.make_node("Add", [acc, term], [y], name=node_name))
        acc = y
    for p, node, initializers in built:
        graph.initializer.extend(initializers)
        state.created.update(t.name for t in initializers)
        chains = p.chains
        forms = ", ".join("+".join(op.kind for op in chain) or "identity" for chain in chains)
        assert p.plan.spec is not None
        mark_merged(node, "sum", [op.node for chain in chains for op in chain] + tree)
        state.merges += 1
        state.report.merged(
            "sum",
            [label(op.node) for chain in chains for op in chain] + [label(n) for n in tree],
            node.name,
            p.plan.before,
            p.plan.after,
            "; ".join(n for n in (f"{len(chains)} branches of {p.source!r}: {forms}", p.plan.note) if n),
            p.plan.timing,
        )
    rewrite.replace[id(root)] = new_nodes
    rewrite.removed.update(id(n) for n in tree)
    rewrite.removed.update(id(op.node) for p, _, _ in built for chain in p.chains for op in chain)


#: The rewrite rules, in the order each round applies them.
RULES: tuple[Rule, ...] = (drop_identities, merge_chains, merge_sums)



# --------------------------------------------------------------------------- per graph
def _visible_constants(
    graph: onnx.GraphProto, nodes: list[onnx.NodeProto], outer: dict[str, onnx.TensorProto], state: _State
) -> dict[str, onnx.TensorProto]:
    return dict(_Index(nodes, graph, outer, state).constants)


def _fuse_graph(graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto], state: _State, where: str) -> None:
    nodes: list[onnx.NodeProto] = []
    for original in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(original)
        nodes.append(copy)
    referenced_before = _referenced(graph, nodes)
    defined_before = _defined(graph, nodes)
    visible = _visible_constants(graph, nodes, outer, state)
    for node in nodes:
        for sub in _subgraphs(node):
            state.subgraphs += 1
            _fuse_graph(sub, visible, state, f"subgraph {sub.name or '?'} of {label(node)}")
    declines: _Declines = []
    for round_no in range(1, _MAX_ROUNDS + 1):
        declines = []
        changed = False
        for rule in RULES:
            rewritten = rule(_Index(nodes, graph, outer, state), graph, state, declines)
            if rewritten is not None:
                nodes = rewritten
                changed = True
        state.say(f"{where}: round {round_no}, {state.merges} merges so far")
        if not changed:
            break
    else:
        state.report.notes.append(f"{where}: stopped after {_MAX_ROUNDS} rounds of rewriting")
    seen: set[tuple[tuple[int, ...], str, str]] = set()
    for sources, decline in [*declines, *unread_nodes(nodes)]:
        key = (tuple(id(n) for n in sources), decline.reason.value, decline.message)
        if key not in seen:
            seen.add(key)
            state.report.declined([label(n) for n in sources], decline)
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
    nodes = [
        n
        for n in nodes
        if not (
            n.op_type == "Constant"
            and _is_default(n)
            and all(o not in referenced and o in referenced_before for o in n.output)
        )
    ]
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
        for sub in _subgraphs(node):
            _collect_shapes(sub, shapes)


def _collect_initializers(graph: onnx.GraphProto, shapes: Shapes) -> None:
    for init in graph.initializer:
        shapes[init.name] = (int(init.data_type), tuple(int(d) for d in init.dims))
    for node in graph.node:
        for sub in _subgraphs(node):
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


def model_stats(model: onnx.ModelProto, shapes: Shapes | None = None) -> ModelStats:
    """Op counts (all graphs), floating-point parameters, and Conv MACs per sample (``None`` if any
    Conv's output shape is unknown)."""
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
            if node.op_type == "Conv" and _is_default(node) and len(node.input) >= 2:
                w = dims.get(node.input[1])
                if w is None:
                    entry = shapes.get(node.input[1])
                    w = None if entry is None or entry[1] is None else [d or 0 for d in entry[1]]
                out = shapes.get(node.output[0])
                macs = None if w is None or out is None else conv_macs(w, out[1])
                if macs is None:
                    totals["unknown"] += 1
                else:
                    totals["macs"] += macs
            for sub in _subgraphs(node):
                walk(sub, dims)

    walk(model.graph, {})
    macs = None if totals["unknown"] else totals["macs"]
    return ModelStats(dict(counts), totals["params"], macs, _size(model))


def _size(model: onnx.ModelProto) -> int | None:
    """Bytes of the model serialised with its weights inline (None past protobuf's 2 GiB)."""
    try:
        return int(model.ByteSize())
    except Exception:  # protobuf refuses messages over 2 GiB
        return None


def _summarise(report: Report) -> None:
    """Keep the ops a reader cares about: REPORTED_OPS and any op whose count changed."""
    before, after = report.before.op_counts, report.after.op_counts
    keep = set(REPORTED_OPS) | {op for op in set(before) | set(after) if before.get(op, 0) != after.get(op, 0)}
    report.before.op_counts = {op: before.get(op, 0) for op in sorted(keep)}
    report.after.op_counts = {op: after.get(op, 0) for op in sorted(keep)}


# --------------------------------------------------------------------------- public API
def fuse_onnx(
    model: onnx.ModelProto | str | os.PathLike[str],
    policy: Policy | str = Policy.FLOPS,
    *,
    progress: Progress | None = None,
    device: str = "cpu",
    latency_budget: float = DEFAULT_BUDGET,
    timer: Timer | None = None,
    inplace: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Merge every linear run of ``model`` into single convolutions; return a new model and a report.

    ``model`` is a ``ModelProto`` (left unchanged unless ``inplace``) or a path (external data
    beside it is read). ``policy``: ``"flops"`` merges only what does not increase MACs or
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
    meter = LatencyMeter(device, latency_budget, timer=timer, progress=say) if chosen is Policy.LATENCY else None
    judge = Judge(chosen, meter)
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
    report.after = model_stats(fused, infer_shapes(fused)[0])
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
        report.notes.append("MACs: multiply-accumulates of Conv nodes per sample")
    report.notes.extend(judge.notes())
    return fused, report
