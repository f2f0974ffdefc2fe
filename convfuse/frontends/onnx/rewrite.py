"""The ONNX rewrite engine: the rules (:data:`RULES`) applied to every graph, subgraphs first, in
rounds until nothing changes, and the cleanup of what they leave unused.

Rules, applied to every graph, subgraphs first:

1. **Identity.** ``y = Identity(x)``: consumers read ``x`` instead. When ``y`` is a graph output,
   ``x``'s producer writes ``y`` directly (graph outputs keep their names), if it can. Repeated
   until nothing changes.
2. **Linear regions.** Every node :mod:`.nodes` reads as linear in one activation (Conv,
   inference BatchNormalization, Mul/Add/Sub/Div by a per-channel constant, Neg, zero Pad,
   AveragePool) and every ``Add``/``Sub``/``Sum`` of activations and ``Concat`` on channels
   becomes a :class:`~convfuse.ir.LinearNode`; :func:`convfuse.planner.plan` finds the regions
   and decides what merges; each merge becomes one Conv, each sum left with fewer terms is
   rebuilt from Add/Sub (or one Sum). Run once (:mod:`.importer` and :mod:`.export`).

A tensor read by a node that is not linear, or that is a graph output, is never merged away.
Merged nodes take the name of the first convolution they replace; untouched nodes are left as
they are.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from ...algebra import Cost
from ...decline import Decline, Reason
from .export import merge_regions
from .index import _FOLDABLE, _Declines, _defined, _Index, _is_default, _referenced, _State
from .io import subgraphs
from .nodes import label, unread_nodes

__all__ = ["RULES", "drop_identities"]

#: Safety stop for the rewrite loop (each round removes at least one node or sum term).
_MAX_ROUNDS = 100


_ZERO = Cost(0, 0)


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
