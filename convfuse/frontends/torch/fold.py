"""Fold what a traced forward computes from module state only into constants (issue 16).

Pattern: an edge ``u -> n`` of an fx graph where ``u`` reads only module state (parameters,
buffers, constants the forward creates: ``self.scale * self.mask``, ``self.weight + B @ A``, a
merged kernel built by ``self.rep_params()`` on every call) and ``n`` reads the input
(``F.conv2d(x, u, ...)``). The value of ``u`` is the same on every call, so it is computed once,
on private copies of the state, at the point ``n`` reads it, and ``n`` reads a stored tensor
instead (a parameter when ``u`` was computed from parameters, so it trains, moves with ``.to()``
and is saved by ``state_dict``; a buffer otherwise). The layer ``n`` then has a constant weight:
an ordinary conv to the importer and the planner.

Conditions (a decline names the edge otherwise):

* ``u`` does not read a tensor of the module that the forward writes in place (a buffer updated
  in forward: its value changes between calls), nor a constant the forward writes from the
  input;
* nothing ``u`` depends on is random (``torch.rand*``, ``dropout`` ...);
* ``u`` is a tensor computed by at least one op that is not a view (a plain ``self.weight`` or
  ``self.weight.view(...)`` is read as it is already);
* the forward assigns no attributes (the caller does not fold then: a generated forward would
  not repeat the assignment).

Writes into constants the forward creates (``k = torch.zeros(...); k[i, i] = tmp[i]``) are part
of the computation: every node that reads only state runs in graph order, in-place writes
included, and ``u`` is taken as ``n`` sees it. Nodes that read only state and that nothing reads
any more are dropped; the attributes they read are dropped by the front end's clean-up when no
other node reads them.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ...decline import Decline, Reason
from .capture import MISSING, Taint, evaluate, node_taint, raw_attribute, state_copy

__all__ = [
    "Folded",
    "FoldResult",
    "StateValues",
    "drop_dead_state",
    "fold_state",
    "is_inplace",
    "label",
    "mutated_base",
]

_RANDOM_FUNCTIONS = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson,
    torch.dropout, torch.nn.functional.dropout, torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d, torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout, torch.nn.functional.gumbel_softmax,
}  # fmt: skip
_RANDOM_METHODS = {"uniform_", "normal_", "bernoulli", "bernoulli_", "random_", "exponential_",
                   "geometric_", "cauchy_", "log_normal_", "multinomial"}  # fmt: skip
_VIEW_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "transpose", "permute", "expand",
                 "detach", "contiguous", "view_as", "reshape_as", "expand_as", "t", "unflatten",
                 "narrow"}  # fmt: skip
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten,
                   torch.transpose, torch.permute, torch.narrow, torch.detach, getattr}  # fmt: skip
_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def label(node: fx.Node) -> str:
    """A node as report lines name it: a module call by its path, a function call inside a
    module as ``<module path>:<node>``."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    owner = str(list(stack.values())[-1][0]) if stack else ""
    return f"{owner}:{node.name}" if owner else node.name


def _is_random(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RANDOM_FUNCTIONS
    return node.op == "call_method" and node.target in _RANDOM_METHODS


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def is_inplace(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument (``t.add_(...)``, ``t[i] = v``, ``out=``)."""
    if "out" in node.kwargs:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))
    return False


def mutated_base(node: fx.Node) -> fx.Node | None:
    """The node whose tensor an in-place ``node`` writes, through views of it."""
    base = node.args[0] if node.args else None
    while isinstance(base, fx.Node) and _is_view(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    return base if isinstance(base, fx.Node) else None


@dataclass(frozen=True)
class Folded:
    """The state-only value ``source`` read by ``consumer``, stored at ``target``."""

    target: str
    source: str  # the node's name
    reads: tuple[str, ...]  # the modules whose tensors it was computed from
    consumer: fx.Node
    params_before: int
    params_after: int


@dataclass
class FoldResult:
    folded: list[Folded] = field(default_factory=list)
    declines: list[tuple[tuple[str, ...], Decline]] = field(default_factory=list)
    new: dict[str, Any] = field(default_factory=dict)  # target -> stored tensor
    moved: list[Any] = field(default_factory=list)  # borders read as pads (:mod:`.fill`), set by the caller


class StateValues:
    """Taints of a graph's nodes and the values of its state-only nodes as each reader sees them.

    Runs every state-only node in graph order on private copies of the module's tensors
    (in-place writes to them included); :meth:`snapshot` gives the value of node ``u`` at the
    point where node ``n`` reads it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.taints: dict[fx.Node, Taint] = {}
        for node in self.nodes:
            self.taints[node] = node_taint(node, self.taints)
        self.random = {n for n in self.nodes if _is_random(n)}
        self._values: dict[fx.Node, Any] = {}
        self._attrs: dict[str, Any] = {}
        self._snaps: dict[tuple[fx.Node, fx.Node], Any] = {}
        self._ran = False

    def state(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and self.taints.get(node) is Taint.STATE

    def run(self, wanted: set[tuple[fx.Node, fx.Node]]) -> None:
        """Evaluate; remember a copy of ``u`` as ``n`` sees it for every ``(n, u)`` in ``wanted``."""
        by_reader: dict[fx.Node, list[fx.Node]] = {}
        for n, u in wanted:
            by_reader.setdefault(n, []).append(u)
        for node in self.nodes:
            for u in by_reader.get(node, []):
                value = self._values.get(u, MISSING)
                self._snaps[(node, u)] = value.clone() if isinstance(value, torch.Tensor) else value
            if self.state(node):
                self._values[node] = self._evaluate(node)

    def _evaluate(self, node: fx.Node) -> Any:
        return evaluate(node, self._values, lambda t: state_copy(self.gm, t, self._attrs))

    def snapshot(self, reader: fx.Node, node: fx.Node) -> Any:
        return self._snaps.get((reader, node), MISSING)


def _ancestors(node: fx.Node, writers: dict[fx.Node, list[fx.Node]]) -> list[fx.Node]:
    """``node`` and everything its value depends on, in-place writes into those tensors included."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo += n.all_input_nodes
        todo += writers.get(n, [])
    return list(seen)


def _reads(nodes: list[fx.Node]) -> tuple[str, ...]:
    return tuple(sorted({str(n.target) for n in nodes if n.op == "get_attr"}))


def _owners(targets: tuple[str, ...], extras: dict[str, Any]) -> tuple[str, ...]:
    """The modules whose tensors ``targets`` are (a root attribute by its own name); the tracer's
    constants left out."""
    out = {t.rpartition(".")[0] or t for t in targets if t not in extras}
    return tuple(sorted(out))


def fold_state(gm: fx.GraphModule, extras: dict[str, Any], name: str, blocked: str = "") -> FoldResult:
    """Fold every state-only value an input-reading node reads (module docstring), in place on
    ``gm``'s graph; new tensors live on ``gm`` (and in ``result.new``) at fresh names from
    ``name``. ``extras``: the tracer's own constants (``_tensor_constant0``: created by the
    forward each call, so writing into them is part of the computation)."""
    values = StateValues(gm)
    result = FoldResult()
    graph = gm.graph
    writers, updated = _writes(values, extras)
    # Candidate edges: a state-only tensor read by a node that reads the input.
    edges: list[tuple[fx.Node, fx.Node, list[fx.Node]]] = []
    for n in values.nodes:
        if values.state(n) or n.op == "output" or is_inplace(n):
            continue
        for u in dict.fromkeys(n.all_input_nodes):
            if not values.state(u) or u.op == "get_attr":
                continue
            deps = _ancestors(u, writers)
            if all(d.op == "get_attr" or _is_view(d) for d in deps):
                continue  # a plain parameter or a view of one: read as it is
            if any(values.taints.get(d) is not Taint.STATE for d in deps):
                continue  # written from the input somewhere: not state-only after all
            sources = (label(u), *_owners(_reads(deps), extras))
            random = [d for d in deps if d in values.random]
            if random:
                result.declines.append(
                    (
                        sources,
                        Decline(
                            Reason.NONDETERMINISTIC,
                            f"{u.name} depends on {random[0].name}, a random op; not folded",
                        ),
                    )
                )
                continue
            hit = [(t, how) for t, how in updated.items() if t in _reads(deps)]
            if hit:
                written, how = hit[0]
                result.declines.append(
                    (
                        sources,
                        Decline(
                            Reason.NON_CONSTANT,
                            f"{u.name} reads {written}, which the forward updates ({how}): its value changes "
                            "between calls, so it is not folded",
                        ),
                    )
                )
                continue
            edges.append((n, u, deps))
    if blocked:
        for _, u, deps in edges:
            message = f"{u.name} is computed from module state only, but {blocked}; not folded"
            result.declines.append(
                ((label(u), *_owners(_reads(deps), extras)), Decline(Reason.NON_CONSTANT, message))
            )
        return result
    if not edges:
        return result
    values.run({(n, u) for n, u, _ in edges})
    stored: dict[tuple[fx.Node, int], str] = {}  # (source, value id) -> target, one tensor per value
    for n, u, deps in edges:
        value = values.snapshot(n, u)
        if not isinstance(value, torch.Tensor):
            continue
        params = [raw_attribute(gm, str(d.target)) for d in deps if d.op == "get_attr"]
        trains = any(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
        target: str | None = next(
            (t for (src, _), t in stored.items() if src is u and torch.equal(result.new[t], value)), None
        )
        if target is None:
            target = _fresh(gm, name)
            tensor: torch.Tensor = nn.Parameter(value, requires_grad=True) if trains else value
            if isinstance(tensor, nn.Parameter):
                gm.register_parameter(target, tensor)
            else:
                gm.register_buffer(target, tensor)
            result.new[target] = tensor
            stored[(u, id(tensor))] = target
        with graph.inserting_before(n):
            attr = graph.get_attr(target)
        attr.meta = {k: v for k, v in n.meta.items() if k == "nn_module_stack"}
        n.replace_input_with(u, attr)
        seen_params: dict[Hashable, int] = {id(p): p.numel() for p in params if isinstance(p, nn.Parameter)}
        result.folded.append(
            Folded(
                target,
                label(u),
                _owners(_reads(deps), extras),
                n,
                sum(seen_params.values()),
                value.numel() if trains else 0,
            )
        )
    return result


def _writes(
    values: StateValues, extras: dict[str, Any]
) -> tuple[dict[fx.Node, list[fx.Node]], dict[str, str]]:
    """In-place writes by the tensor they write (every get_attr of a target stands for it), and
    the attributes the forward updates (the module's own tensors, or any written from the input)."""
    writers: dict[fx.Node, list[fx.Node]] = {}
    updated: dict[str, str] = {}
    by_target: dict[str, list[fx.Node]] = {}
    for node in values.nodes:
        if node.op == "get_attr":
            by_target.setdefault(str(node.target), []).append(node)
    for node in values.nodes:
        base = mutated_base(node) if is_inplace(node) else None
        if base is None:
            continue
        if base.op != "get_attr":
            writers.setdefault(base, []).append(node)
            continue
        for alias in by_target.get(str(base.target), []):
            writers.setdefault(alias, []).append(node)
        target = str(base.target)
        from_input = any(values.taints.get(a) is not Taint.STATE for a in node.all_input_nodes)
        if target not in extras or from_input:
            updated[target] = f"{node.name} writes it in place" + (" from the input" if from_input else "")
    return writers, updated


def drop_dead_state(gm: fx.GraphModule, extras: dict[str, Any]) -> None:
    """Erase state-only nodes nothing reads any more; writes into the module's own tensors stay.
    An unread get_attr is left to the caller's clean-up (which drops the attribute) unless its
    owner is a layer the graph calls (the tensor belongs to the layer, which is not ours to edit)."""
    graph = gm.graph
    values = StateValues(gm)
    writers, updated = _writes(values, extras)
    live: set[fx.Node] = set()
    for node in graph.nodes:
        if values.state(node) and not (is_inplace(node) and _writes_module(node, updated)):
            continue
        for dep in node.all_input_nodes:
            if values.state(dep):
                live.update(_ancestors(dep, writers))
        if values.state(node):
            live.update(_ancestors(node, writers))
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    for node in reversed(list(graph.nodes)):
        if not values.state(node) or node in live or node.users:
            continue
        if node.op != "get_attr" or str(node.target).rpartition(".")[0] in called:
            graph.erase_node(node)  # a called layer's own tensor stays with the layer


def _writes_module(node: fx.Node, updated: dict[str, str]) -> bool:
    base = mutated_base(node)
    return base is not None and base.op == "get_attr" and str(base.target) in updated


def _fresh(gm: fx.GraphModule, base: str) -> str:
    name, k = base, 0
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name
