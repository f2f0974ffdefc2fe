"""PyTorch front end: ``fuse(module)`` merges every exact linear run of an ``nn.Module``.

An ``nn.Sequential`` (nested too) comes back as an ``nn.Sequential`` with merged layers in
place; any other module is traced with ``torch.fx`` and comes back as a ``GraphModule`` when
something merged. A module fx cannot trace (data-dependent control flow) keeps its own forward
and has its children fused one by one; the report says which modules were not traced.

This module finds regions and writes them back; :mod:`.torch_rules` says which layers are
linear, :mod:`.torch_ir` reduces a region with :mod:`convfuse.algebra`.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils._pytree import tree_flatten

from ..decline import Decline, Reason
from ..errors import InvalidModelError, TrainingModeError
from ..policy import Policy
from ..report import ModelStats, Report
from .torch_ir import (
    Branches,
    IdentityOp,
    Kept,
    LinearOp,
    Merged,
    Piece,
    Step,
    SumStep,
    TensorInfo,
    reduce_region,
    region_info,
)
from .torch_layers import conv_from_spec
from .torch_rules import UNKNOWN, Terms, Unary, call_op, module_op

__all__ = ["fuse", "fuse_with_report"]

_BATCHNORM = nn.modules.batchnorm._BatchNorm
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


# --------------------------------------------------------------------------- public API
def fuse(
    module: nn.Module,
    policy: Policy | str = "flops",
    return_report: bool = False,
    example_inputs: Any = None,
) -> nn.Module | tuple[nn.Module, Report]:
    """A new module computing what ``module`` computes with its linear runs merged.

    An ``nn.Sequential`` comes back as an ``nn.Sequential``; another module as a
    ``torch.fx.GraphModule`` when something merged (else as a copy of itself); a module fx
    cannot trace keeps its forward and has its children fused (the report names it).
    ``policy``: ``"flops"`` (default) merges only what does not increase MACs or parameters,
    ``"always"`` every exact candidate. ``example_inputs`` (a tensor or tuple) gives shapes to
    regions whose layers do not fix their channel count, and lets the report count MACs and
    the output error. The caller's module is never modified. Raises ``TrainingModeError`` for
    a BatchNorm in training mode. Returns the module, or ``(module, report)`` with
    ``return_report=True``.
    """
    fused, report = fuse_with_report(module, policy=policy, example_inputs=example_inputs)
    return (fused, report) if return_report else fused


def fuse_with_report(
    module: nn.Module, policy: Policy | str = "flops", example_inputs: Any = None
) -> tuple[nn.Module, Report]:
    """Like :func:`fuse`, always returning ``(module, report)``."""
    if not isinstance(module, nn.Module):
        raise InvalidModelError(f"fuse expects a torch.nn.Module, got {type(module).__name__}")
    policy = Policy.parse(policy)
    _refuse_training_batchnorm(module)
    inputs = _as_inputs(example_inputs)
    report = Report()
    report.notes.append(f"policy: {policy.value}")
    report.before, ref_out = _stats(module, inputs, report)
    try:
        work = copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot work on a copy
        raise InvalidModelError(f"cannot copy {type(module).__name__} to fuse it: {exc}") from exc
    ctx = _Context(policy, report, inputs)
    with torch.no_grad():
        fused = _fuse_any(work, "", ctx, top=True)
    report.after, out = _stats(fused, inputs, report)
    if ctx.untraced:
        report.notes.append(
            f"not traced by torch.fx (children fused separately): {', '.join(ctx.untraced)}"
        )
    if ref_out is not None and out is not None:
        report.notes.append(f"example_inputs: max relative output error {_relative_error(ref_out, out):.2e}")
    return fused, report


# --------------------------------------------------------------------------- checks and stats
def _refuse_training_batchnorm(module: nn.Module) -> None:
    for name, m in module.named_modules():
        if isinstance(m, _BATCHNORM) and m.training:
            where = name or "the module itself"
            raise TrainingModeError(
                f"{type(m).__name__} at {where!r} is in training mode and normalises with batch statistics, "
                f"so it cannot be folded; call .eval() on the module before fusing"
            )


def _as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _stats(module: nn.Module, inputs: tuple[Any, ...] | None, report: Report) -> tuple[ModelStats, Any]:
    """Leaf layer counts, parameters, and MACs (convs and matrix products) on ``inputs``."""
    counts = Counter(type(m).__name__ for m in module.modules() if next(m.children(), None) is None)
    params = sum(p.numel() for p in module.parameters())
    stats = ModelStats(op_counts=dict(counts), params=params)
    if inputs is None:
        return stats, None
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = module(*inputs)
    except Exception as exc:  # noqa: BLE001 - reported, MACs stay unknown
        report.notes.append(f"could not run example_inputs through {type(module).__name__}: {exc}")
        return stats, None
    stats.macs = int(counter.get_total_flops() // 2)
    return stats, out


def _relative_error(ref: Any, out: Any) -> float:
    """Max abs error over max abs reference output, over all tensors of the outputs."""
    ref_leaves = [t for t in tree_flatten(ref)[0] if isinstance(t, torch.Tensor)]
    out_leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if len(ref_leaves) != len(out_leaves) or any(a.shape != b.shape for a, b in zip(ref_leaves, out_leaves)):
        return float("inf")
    err = max((float((a.double() - b.double()).abs().max()) for a, b in zip(ref_leaves, out_leaves) if a.numel()), default=0.0)
    scale = max((float(a.double().abs().max()) for a in ref_leaves if a.numel()), default=0.0)
    return err / scale if scale else err


# --------------------------------------------------------------------------- dispatch
@dataclass
class _Context:
    policy: Policy
    report: Report
    inputs: tuple[Any, ...] | None
    untraced: list[str] = field(default_factory=list)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fuse_any(module: nn.Module, prefix: str, ctx: _Context, top: bool = False) -> nn.Module:
    """Fuse ``module`` (a private copy) by the route its type allows; returns what replaces it."""
    if _is_plain_sequential(module):
        return _fuse_sequential(module, prefix, ctx)
    if isinstance(module, _CONTAINERS):
        _fuse_children(module, prefix, ctx)
        return module
    if module_op(module, prefix) is not None:
        return module  # a single known layer
    if type(module).__module__.startswith("torch.nn") and next(module.children(), None) is None:
        return module  # a torch leaf layer (activation, pooling, ...): nothing inside
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to the children
        where = prefix or type(module).__name__
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        ctx.untraced.append(where)
        ctx.report.declined(
            (where,),
            Decline(
                Reason.UNTRACEABLE,
                f"torch.fx cannot trace {type(module).__name__} ({first_line}); its forward is kept and its "
                "children were fused separately",
            ),
        )
        _fuse_children(module, prefix, ctx)
        return module
    changed = _GraphFuser(gm, prefix, ctx, ctx.inputs if top else None).run()
    return gm if changed else module


def _fuse_children(module: nn.Module, prefix: str, ctx: _Context) -> None:
    for name, child in list(module.named_children()):
        new = _fuse_any(child, _join(prefix, name), ctx)
        if new is not child:
            setattr(module, name, new)


# --------------------------------------------------------------------------- nn.Sequential
def _linear_ops(module: nn.Module, name: str, key: str) -> list[LinearOp] | Decline | None:
    """``module`` as a list of linear ops (a layer, an all-linear Sequential, a straight-line
    GraphModule of linear layers), the reason a known layer is not linear, or None."""
    op = module_op(module, name)
    if isinstance(op, (LinearOp, Decline)):
        if isinstance(op, LinearOp):
            op.origin = (key, module)
        return op if isinstance(op, Decline) else [op]
    children: list[tuple[str, nn.Module]] = []
    if _is_plain_sequential(module):
        children = list(module.named_children())
        if not children:
            return [IdentityOp(name, origin=(key, module))]
    elif isinstance(module, fx.GraphModule):
        children = _straight_line(module)
        if children is None:
            return None
    else:
        return None
    ops: list[LinearOp] = []
    for child_key, child in children:
        sub = _linear_ops(child, _join(name, child_key), f"{key}_{child_key.replace('.', '_')}")
        if not isinstance(sub, list):
            return None
        ops += sub
    return ops


def _straight_line(gm: fx.GraphModule) -> list[tuple[str, nn.Module]] | None:
    """The modules of ``x -> m1 -> m2 -> ... -> return``, or None for any other graph."""
    nodes = list(gm.graph.nodes)
    if len(nodes) < 2 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    prev = nodes[0]
    out = []
    for node in nodes[1:-1]:
        if node.op != "call_module" or node.args != (prev,) or node.kwargs:
            return None
        out.append((node.target, gm.get_submodule(node.target)))
        prev = node
    return out if nodes[-1].args == (prev,) else None


def _fuse_sequential(seq: nn.Sequential, prefix: str, ctx: _Context) -> nn.Sequential:
    """Merge runs of linear layers of ``seq`` in place; other children are fused recursively."""
    keys = list(seq._modules)
    numbered = keys == [str(i) for i in range(len(keys))]
    items: list[tuple[str, nn.Module, list[LinearOp] | Decline | None]] = []
    for key, child in list(seq._modules.items()):
        name = _join(prefix, key)
        ops = _linear_ops(child, name, key)
        if not isinstance(ops, list):
            child = _fuse_any(child, name, ctx)
            fused_ops = _linear_ops(child, name, key)
            ops = fused_ops if isinstance(fused_ops, list) else ops
        items.append((key, child, ops))
    for i, (_, _, ops) in enumerate(items):
        neighbours = [items[j][2] for j in (i - 1, i + 1) if 0 <= j < len(items)]
        if isinstance(ops, Decline) and any(isinstance(n, list) for n in neighbours):
            ctx.report.declined((_join(prefix, items[i][0]),), ops)

    out: list[tuple[str, nn.Module]] = []
    merges: list[tuple[int, Merged]] = []
    run: list[tuple[str, nn.Module, list[LinearOp]]] = []
    for key, child, ops in items:
        if isinstance(ops, list):
            run.append((key, child, ops))
            continue
        _write_run(run, ctx, out, merges)
        run = []
        out.append((key, child))
    _write_run(run, ctx, out, merges)
    out = [(str(i), m) for i, (_, m) in enumerate(out)] if numbered else _unique_keys(out)
    for index, piece in merges:
        target = _join(prefix, out[index][0]) if index >= 0 else "(removed)"
        ctx.report.merged(piece.kind, piece.sources, target, piece.before, piece.after, piece.note)
    seq._modules.clear()
    seq._modules.update(OrderedDict(out))
    return seq


def _unique_keys(items: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Suffix repeated keys (a layer lifted out of a nested Sequential may reuse a name)."""
    seen: set[str] = set()
    out = []
    for key, module in items:
        new, i = key, 0
        while new in seen:
            i += 1
            new = f"{key}_{i}"
        seen.add(new)
        out.append((new, module))
    return out


def _write_run(
    run: list[tuple[str, nn.Module, list[LinearOp]]],
    ctx: _Context,
    out: list[tuple[str, nn.Module]],
    merges: list[tuple[int, Merged]],
) -> None:
    """Append the layers a run reduces to (or the run unchanged) to ``out``."""
    unchanged = [(k, m) for k, m, _ in run]
    steps: list[Step] = [op for _, _, ops in run for op in ops]
    info = region_info(steps) if steps else None
    if info is None:
        out += unchanged
        return
    red = reduce_region(steps, info, ctx.policy, ctx.report)
    if isinstance(red, Decline):
        ctx.report.declined(tuple(op.name for op in steps), red)
        out += unchanged
        return
    if not red.changed:
        out += unchanged
        return
    key_of = {op.name: op.origin[0] for op in steps}
    for piece in red.pieces:
        if isinstance(piece, Kept):
            out.append(piece.op.origin)
        elif isinstance(piece, Merged):
            if piece.spec is None:
                merges.append((-1, piece))
                continue
            merges.append((len(out), piece))
            out.append((key_of[piece.sources[0]], conv_from_spec(piece.spec)))
        else:  # pragma: no cover - a chain has no branches
            raise AssertionError("a Sequential run reduced to branches")


# --------------------------------------------------------------------------- torch.fx graphs
def _verbatim(steps: Sequence[Step]) -> list[Piece]:
    """Steps written back as they are."""
    return [
        Branches([_verbatim(b) for b in step.branches]) if isinstance(step, SumStep) else Kept(step)
        for step in steps
    ]


_CONST_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "detach", "contiguous", "flatten"}
_CONST_FUNCTIONS = {operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten}


_VIEW_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "transpose", "permute", "narrow",
                 "select", "expand", "as_strided", "detach", "contiguous", "view_as", "unflatten", "t"}  # fmt: skip
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten,
                   torch.transpose, torch.permute, torch.narrow, torch.select, torch.detach}  # fmt: skip


def _is_view(node: fx.Node) -> bool:
    """Whether ``node`` may return a view sharing memory with its input."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may write into a tensor it reads."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    if node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__")):
        return True
    try:
        bound = inspect.signature(node.target).bind_partial(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):
        return bool(node.kwargs.get("inplace"))
    return bool(bound.get("inplace"))


class _GraphFuser:
    """Find maximal linear regions of a traced graph, reduce them, write them back."""

    def __init__(self, gm: fx.GraphModule, prefix: str, ctx: _Context, inputs: tuple[Any, ...] | None) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.prefix = prefix
        self.ctx = ctx
        self.entries: dict[fx.Node, Unary | Terms] = {}
        self.nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.module_names: set[str] = set()
        self.shared_reported: set[fx.Node] = set()
        self.changed = False
        self._const_cache: dict[fx.Node, Any] = {}
        if inputs is not None:
            try:
                ShapeProp(gm).propagate(*inputs)
            except Exception as exc:  # noqa: BLE001 - shapes are optional
                ctx.report.notes.append(f"shape propagation failed ({exc}); shapes inferred from layers")

    # ------------------------------------------------------------------ constants
    def _const(self, node: fx.Node) -> Any:
        """The value of a node computed from attributes only, else UNKNOWN."""
        if node in self._const_cache:
            return self._const_cache[node]
        value: Any = UNKNOWN
        if node.op == "get_attr":
            try:
                value = operator.attrgetter(node.target)(self.gm)
            except AttributeError:
                value = UNKNOWN
            if not isinstance(value, torch.Tensor):
                value = UNKNOWN
        elif (node.op == "call_method" and node.target in _CONST_METHODS) or (
            node.op == "call_function" and node.target in _CONST_FUNCTIONS
        ):
            args = [self._const(a) if isinstance(a, fx.Node) else a for a in node.args]
            if all(a is not UNKNOWN for a in args) and not any(isinstance(v, fx.Node) for v in node.kwargs.values()):
                try:
                    if node.op == "call_method":
                        value = getattr(args[0], node.target)(*args[1:], **node.kwargs)
                    else:
                        value = node.target(*args, **node.kwargs)
                except Exception:  # noqa: BLE001 - not a constant we can evaluate
                    value = UNKNOWN
                if not isinstance(value, torch.Tensor):
                    value = UNKNOWN
        self._const_cache[node] = value
        return value

    def _resolve(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            value = self._const(arg)
            return arg if value is UNKNOWN else value
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return arg
        return UNKNOWN

    # ------------------------------------------------------------------ IR
    def _name(self, target: str) -> str:
        return _join(self.prefix, target)

    def _build(self) -> None:
        declined: dict[fx.Node, Decline] = {}
        for node in self.nodes:
            entry: Any = None
            if node.op == "call_module":
                module = self.gm.get_submodule(node.target)
                if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
                    op = module_op(module, self._name(node.target))
                    entry = Unary(op, node.args[0]) if isinstance(op, LinearOp) else op
                    self.module_names.add(self._name(node.target))
            elif node.op in ("call_function", "call_method"):
                entry = call_op(node, self._resolve)
            if isinstance(entry, Decline):
                declined[node] = entry
            elif entry is not None:
                if isinstance(entry, Unary):
                    entry.op.origin = node
                self.entries[node] = entry
        for node, decline in declined.items():
            near = list(node.all_input_nodes) + list(node.users)
            if any(n in self.entries for n in near):
                self.ctx.report.declined((self._node_name(node),), decline)

    def _node_name(self, node: fx.Node) -> str:
        return self._name(node.target) if node.op == "call_module" else node.name

    def _expr(self, node: fx.Node, top: bool) -> tuple[fx.Node, list[Step], set[fx.Node]]:
        """The longest linear expression ending at ``node``: (source, steps, nodes absorbed).

        A tensor is absorbed when its only user is in the expression; branches of a sum must
        reach one source, and the expression goes on past that source when every user of it is
        inside.
        """
        entry = self.entries.get(node)
        if entry is None or (not top and len(node.users) != 1):
            return node, [], set()
        if isinstance(entry, Unary):
            src, steps, nodes = self._expr(entry.input, False)
            return src, steps + [entry.op], nodes | {node}
        terms, sum_nodes = self._flat_terms(node)
        parts = [(self._expr(inp, False), tail) for inp, tail in terms]
        sources = {p[0][0] for p in parts}
        if len(sources) != 1:
            return node, [], set()
        nodes = sum_nodes.union(*(p[0][2] for p in parts))
        src = sources.pop()
        step = SumStep([steps + list(tail) for (_, steps, _), tail in parts], name=node.name)
        if src in self.entries and all(u in nodes for u in src.users):
            src2, pre, more = self._expr(src, True)
            return src2, pre + [step], nodes | more
        return src, [step], nodes

    # ------------------------------------------------------------------ regions
    def run(self) -> bool:
        self._build()
        visited: set[fx.Node] = set()
        for root in reversed(self.nodes):
            if root in visited or root not in self.entries:
                continue
            src, steps, nodes = self._expr(root, True)
            if not steps:
                if isinstance(self.entries[root], Terms):
                    visited |= self._mixed_sum(root)
                continue
            visited |= nodes
            info = self._info(src, steps)
            if info is None:
                continue
            self._report_shared(src, nodes)
            hazard = self._inplace_hazard(root, nodes)
            names = tuple(self._node_name(n) for n in sorted(nodes, key=self.order.__getitem__))
            if hazard is not None:
                self.ctx.report.declined(names, hazard)
                continue
            red = reduce_region(steps, info, self.ctx.policy, self.ctx.report)
            if isinstance(red, Decline):
                self.ctx.report.declined(names, red)
                continue
            if red.changed:
                self._write(root, src, red.pieces, nodes)
        if self.changed:
            self._clean()
        return self.changed

    def _info(self, src: fx.Node, steps: list[Step]) -> TensorInfo | None:
        meta = src.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            return region_info(steps, tuple(meta.shape), meta.dtype)
        return region_info(steps)

    def _flat_terms(self, node: fx.Node) -> tuple[list[tuple[fx.Node, list[LinearOp]]], set[fx.Node]]:
        """The terms of a sum, with nested sums used only here flattened into it."""
        out: list[tuple[fx.Node, list[LinearOp]]] = []
        nodes = {node}
        for inp, tail in self.entries[node].terms:
            if isinstance(self.entries.get(inp), Terms) and len(inp.users) == 1:
                inner, more = self._flat_terms(inp)
                out += [(t, list(t_tail) + list(tail)) for t, t_tail in inner]
                nodes |= more
            else:
                out.append((inp, list(tail)))
        return out, nodes

    def _mixed_sum(self, root: fx.Node) -> set[fx.Node]:
        """A sum whose terms read different tensors: merge the terms of each tensor separately.

        ``(a(x) + b(y)) + c(x)`` becomes ``merged(x) + b(y)``. Returns the nodes rewritten
        (none when no group of terms merges).
        """
        terms, nodes = self._flat_terms(root)
        groups: dict[fx.Node, list[list[Step]]] = {}
        for inp, tail in terms:
            src, steps, sub = self._expr(inp, False)
            groups.setdefault(src, []).append(steps + tail)
            nodes |= sub
        if all(len(g) == 1 for g in groups.values()):
            return set()
        plans: list[tuple[fx.Node, list[Piece]]] = []
        changed = False
        for src, members in groups.items():
            steps = members[0] if len(members) == 1 else [SumStep(members, name=root.name)]
            pieces = _verbatim(steps)
            info = self._info(src, steps) if steps else None
            if info is not None:
                red = reduce_region(steps, info, self.ctx.policy, self.ctx.report)
                if isinstance(red, Decline):
                    self.ctx.report.declined((root.name,), red)
                elif red.changed:
                    pieces, changed = red.pieces, True
            self._report_shared(src, nodes)  # a shared term is what keeps this sum apart
            plans.append((src, pieces))
        hazard = self._inplace_hazard(root, nodes) if changed else None
        if hazard is not None:
            self.ctx.report.declined((root.name,), hazard)
        if not changed or hazard is not None:
            return set()
        with self.graph.inserting_before(root):
            outs = [self._emit(pieces, src) for src, pieces in plans]
            acc = outs[0]
            for other in outs[1:]:
                acc = self.graph.call_function(operator.add, (acc, other))
        self._replace(root, acc, nodes)
        return nodes

    def _report_shared(self, src: fx.Node, nodes: set[fx.Node]) -> None:
        """An intermediate tensor used outside the region stops the merge: say so."""
        entry = self.entries.get(src)
        if not isinstance(entry, Unary) or isinstance(entry.op, IdentityOp) or src in self.shared_reported:
            return
        outside = [u for u in src.users if u not in nodes]
        if not outside:
            return
        self.shared_reported.add(src)
        inside = [self._node_name(u) for u in src.users if u in nodes]
        users = ", ".join(self._node_name(u) if u.op != "output" else "the model output" for u in outside)
        reason = Reason.GRAPH_OUTPUT if any(u.op == "output" for u in outside) else Reason.SHARED_TENSOR
        self.ctx.report.declined(
            (entry.op.name, *inside),
            Decline(reason, f"the output of {entry.op.name} is also used by {users}, so it must stay computed"),
        )

    def _inplace_hazard(self, root: fx.Node, nodes: set[fx.Node]) -> Decline | None:
        """An in-place write to a tensor the region reads, between its first read and its root:
        the merged conv, placed at the root, would read the modified tensor."""
        inputs = {i for n in nodes for i in n.all_input_nodes if i not in nodes}
        aliases = set()
        todo = list(inputs)
        while todo:  # the inputs and views of them
            n = todo.pop()
            if n in aliases:
                continue
            aliases.add(n)
            todo += [u for u in n.users if u.op in ("call_method", "call_function") and _is_view(u)]
        first = min(self.order[n] for n in nodes)
        for node in self.nodes[first : self.order[root]]:
            if node in nodes or getattr(node, "_erased", False):
                continue
            if _is_inplace(node, self.gm) and any(i in aliases for i in node.all_input_nodes):
                return Decline(
                    Reason.UNSUPPORTED,
                    f"{self._node_name(node)} modifies a tensor this linear region reads, in place, "
                    "between two of its reads",
                )
        return None

    # ------------------------------------------------------------------ write back
    def _write(self, root: fx.Node, src: fx.Node, pieces: list[Piece], nodes: set[fx.Node]) -> None:
        with self.graph.inserting_before(root):
            out = self._emit(pieces, src)
        self._replace(root, out, nodes)

    def _replace(self, root: fx.Node, out: fx.Node, nodes: set[fx.Node]) -> None:
        root.replace_all_uses_with(out)
        for node in sorted(nodes, key=self.order.__getitem__, reverse=True):
            self.graph.erase_node(node)
        self.changed = True

    def _emit(self, pieces: Sequence[Piece], value: fx.Node) -> fx.Node:
        for piece in pieces:
            if isinstance(piece, Kept):
                value = self._copy(piece.op, value)
            elif isinstance(piece, Merged):
                if piece.spec is None:
                    self.ctx.report.merged(piece.kind, piece.sources, "(removed)", piece.before, piece.after, piece.note)
                    continue
                target = self._new_module_name(piece.sources)
                self.gm.add_submodule(target, conv_from_spec(piece.spec))
                value = self.graph.call_module(target, (value,))
                self.ctx.report.merged(
                    piece.kind, piece.sources, self._name(target), piece.before, piece.after, piece.note
                )
            elif isinstance(piece, Branches):
                outs = [self._emit(branch, value) for branch in piece.branches]
                acc = outs[0]
                for other in outs[1:]:
                    acc = self.graph.call_function(operator.add, (acc, other))
                value = acc
        return value

    def _copy(self, op: LinearOp, value: fx.Node) -> fx.Node:
        """The original node of ``op`` reading ``value`` (a virtual scale becomes a mul)."""
        node = op.origin
        if node is None:
            return self.graph.call_function(operator.mul, (value, op.scale))
        entry = self.entries[node]
        old_input = entry.input
        return self.graph.node_copy(node, lambda n: value if n is old_input else n)

    def _new_module_name(self, sources: Iterable[str]) -> str:
        """``<common parent of the merged layers>.fused`` (relative to this graph), made unique."""
        parents = []
        for s in sources:
            if s in self.module_names:
                rel = s[len(self.prefix) + 1 :] if self.prefix else s
                parents.append(rel.split(".")[:-1])
        common: list[str] = []
        if parents:
            for parts in zip(*parents):
                if len(set(parts)) != 1:
                    break
                common.append(parts[0])
        base = ".".join(common + ["fused"])
        name, i = base, 0
        while self._has_path(name):
            i += 1
            name = f"{base}_{i}"
        return name

    def _has_path(self, target: str) -> bool:
        try:
            operator.attrgetter(target)(self.gm)
        except AttributeError:
            return False
        return True

    def _clean(self) -> None:
        """Drop constants and layers nothing uses any more, then regenerate the code."""
        removed_attrs: set[str] = set()
        for node in reversed(list(self.graph.nodes)):
            if node.users or node.op not in ("get_attr", "call_method", "call_function"):
                continue
            if node.op == "get_attr":
                removed_attrs.add(node.target)
                self.graph.erase_node(node)
            elif self._const(node) is not UNKNOWN:
                self.graph.erase_node(node)
        still = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        called = {n.target for n in self.graph.nodes if n.op == "call_module"}
        for target in removed_attrs - still:
            owner_path, _, leaf = target.rpartition(".")
            if owner_path in called:
                continue
            owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
            if hasattr(owner, leaf):
                delattr(owner, leaf)
        for node in self.graph.nodes:
            if isinstance(node.type, str):
                # A PEP 563 string annotation ends up as a string global in the generated code,
                # which torch.save cannot pickle; the annotation carries no behaviour.
                node.type = None
        self.graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
