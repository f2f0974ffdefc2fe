"""The walk over the module tree: each module is merged as a plain ``nn.Sequential`` (the
Sequential route), traced and fused as one graph, or has its children fused one by one; aliased
layers are left alone and a traced result is written back by surgery or a generated forward.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from ...decline import Decline
from ...planner import Merge
from ...report import Report
from .context import _CONTAINERS, _Context, _is_plain_sequential, _join
from .explain import _explain_sequential
from .export import _write_run
from .fold import fold_state
from .ops import IdentityOp, LinearOp
from .regions import _GraphFuser
from .rules import module_op
from .surgery import absorbed as placeholder
from .surgery import get_path, graph_module, has_hooks, install_forward, replace_layer, set_path
from .tracing import _from_fx, _prepare, _report_prepared, _trace


def _fuse_any(
    module: nn.Module, prefix: str, ctx: _Context, top: bool = False, whole: bool = True
) -> nn.Module:
    """Fuse ``module`` (a private copy) in place by the route its type allows; returns it.

    ``whole``: the module's parent calls it as a whole (a Sequential whose children its parent
    calls one by one is fused child by child, never merged across its children).
    """
    if _is_plain_sequential(module):
        if whole:
            return _fuse_sequential(module, prefix, ctx)
        ctx.split.append(prefix or "the model")
        _fuse_children(module, prefix, ctx)
        return module
    if isinstance(module, _CONTAINERS):
        _fuse_children(module, prefix, ctx)
        return module
    if module_op(module, prefix) is not None:
        return module  # a single known layer
    if type(module).__module__.startswith("torch.nn") and next(module.children(), None) is None:
        return module  # a torch leaf layer (activation, pooling, ...): nothing inside
    if _fuse_traced(module, prefix, ctx, ctx.inputs if top else None) is None:
        _fuse_children(module, prefix, ctx)
    return module


def _fuse_children(module: nn.Module, prefix: str, ctx: _Context) -> None:
    """Fuse each child on its own (the parent's forward is kept): a Sequential child is merged
    across its children only when it was seen called as a whole."""
    for name, child in list(module.named_children()):
        whole = ctx.whole is not None and id(child) in ctx.whole
        new = _fuse_any(child, _join(prefix, name), ctx, whole=whole)
        if new is not child:
            setattr(module, name, new)


_MAX_DESCENT = 4


def _fuse_traced(
    module: nn.Module,
    prefix: str,
    ctx: _Context,
    inputs: tuple[Any, ...] | None,
    depth: int = 0,
    straight_only: bool = False,
) -> bool | None:
    """Trace ``module``, merge its graph and write the result back into ``module`` itself.

    Surgery when every merge is a straight run of layer calls (the forward is kept). A merge
    that needs new code inside one child's forward is made by fusing that child on its own
    first (then ``module`` is traced again), so new code is as deep as it can be; one that needs
    new code in ``module``'s own forward gives ``module`` a generated forward
    (:mod:`.torch_surgery`), unless a forward it would replace assigns attributes: then only
    straight runs merge and the others are declined (``straight_only``, the second pass).
    Returns whether it changed, None when it cannot be traced (reported). Hooked children (leaves
    of the trace) are fused on their own.
    """
    traced = _trace(module, prefix, ctx, report=depth == 0)
    if traced is None:
        return None
    graph, extras, writes = traced
    with _from_fx(prefix, module):
        gm = graph_module(module, graph, extras, type(module).__name__)
        before = _Before.of(graph)
        mark = (len(ctx.report.merges), len(ctx.report.declines), len(ctx.report.notes))
        writers = "; ".join(
            f"{_join(prefix, p) or type(module).__name__} assigns {', '.join(w)}" for p, w in writes.items()
        )
        if writes and not straight_only:  # nothing is folded: say so where something could have been
            for sources, decline in fold_state(
                gm, extras, "folded", blocked=f"the forward writes ({writers})"
            ).declines:
                ctx.report.declined(tuple(_join(prefix, s) for s in sources), decline)
        prepared = _prepare(gm, extras, prefix, ctx) if not writes and not straight_only else None
        fuser = _GraphFuser(
            gm, prefix, ctx, inputs, straight_only=writers if straight_only else "", aliased=_aliased(module)
        )
        if prepared is not None and prepared.folded:  # a stored constant needs the generated forward
            fuser.changed = True
            fuser.rewrites += [(False, fuser._scope([f.consumer])) for f in prepared.folded]
        changed = fuser.run()
        if changed and prepared is not None:
            _report_prepared(prepared, prefix, ctx)
        inner = fuser.inner_scopes() if changed and depth < _MAX_DESCENT and not straight_only else []
        children = [get_path(module, scope) for scope in inner]
        if inner and all(
            id(c) not in ctx.descended and _trace(c, "", ctx, report=False) is not None for c in children
        ):
            del ctx.report.merges[mark[0] :], ctx.report.declines[mark[1] :], ctx.report.notes[mark[2] :]
            for scope, child in zip(inner, children):
                ctx.descended.add(id(child))
                _fuse_any(child, _join(prefix, scope), ctx)
            _fuse_traced(module, prefix, ctx, inputs, depth + 1)
            return True
        if changed and not fuser.straight and writers and not straight_only:
            del ctx.report.merges[mark[0] :], ctx.report.declines[mark[1] :], ctx.report.notes[mark[2] :]
            return _fuse_traced(module, prefix, ctx, inputs, depth + 1, straight_only=True)
        if changed:
            _write_back(module, gm, fuser, before, extras)
            ctx.parts.append(module)
    for path in sorted(fuser.declined_children):  # their own forwards may take new code
        child = get_path(module, path)
        if id(child) not in ctx.descended:
            ctx.descended.add(id(child))
            _fuse_any(child, _join(prefix, path), ctx)
    for target in before.calls:
        try:
            child = get_path(module, target)
        except AttributeError:
            continue  # inside a module the write-back replaced
        if has_hooks(child) and module_op(child, target) is None and next(child.children(), None) is not None:
            _fuse_any(child, _join(prefix, target), ctx)
    return changed


def _aliased(module: nn.Module) -> frozenset[str]:
    """Paths of modules registered under more than one path (replacing one path would leave
    the other calling the old layer)."""
    paths: dict[int, list[str]] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    return frozenset(p for names in paths.values() if len(names) > 1 for p in names)


@dataclass
class _Before:
    """What a traced graph used before fusing: layer calls, and modules whose forward it traced."""

    calls: Counter
    traced: set[str]

    @staticmethod
    def of(graph: fx.Graph) -> _Before:
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        traced = {path for n in graph.nodes for path, _ in (n.meta.get("nn_module_stack") or {}).values()}
        return _Before(calls, traced - set(calls))


def _write_back(
    module: nn.Module, gm: fx.GraphModule, fuser: _GraphFuser, before: _Before, extras: dict[str, Any]
) -> None:
    """Put the fused graph ``gm`` (traced from ``module``) into ``module``: merged convs at their
    targets, absorbed layers as ``nn.Identity``; a generated forward where a merge needs one,
    and then a traced-through module the new forward no longer uses at all is an
    ``nn.Identity`` too, one that lost folded weights a plain ``nn.Module`` holding the rest."""
    final = list(gm.graph.nodes)
    called = {n.target for n in final if n.op == "call_module"}
    for target in called:
        new = gm.get_submodule(target)
        try:
            old = get_path(module, target)
        except AttributeError:
            old = None
        if old is not new:
            replace_layer(module, target, new)
    gone = {id(get_path(module, t)) for t in before.calls if t not in called}
    for name, m in list(module.named_modules(remove_duplicate=False)):
        if name and id(m) in gone and name not in called:  # every name the layer has
            replace_layer(module, name, placeholder(m))
    if fuser.straight:
        return
    hollow: set[str] = set()
    for target in fuser.dropped:
        owner_path, _, leaf = target.rpartition(".")
        try:
            owner = get_path(module, owner_path)
        except AttributeError:
            continue
        if isinstance(owner, nn.Module) and owner_path not in called and hasattr(owner, leaf):
            delattr(owner, leaf)
            hollow.add(owner_path)
    used = {n.target for n in final if n.op in ("call_module", "get_attr")}
    for path in sorted(before.traced - {""}, key=lambda p: p.count(".")):
        try:
            old = get_path(module, path)
        except AttributeError:
            continue  # inside a module already replaced
        if not any(u == path or u.startswith(path + ".") for u in used):
            replace_layer(module, path, placeholder(old))
        elif path in hollow:
            set_path(module, path, _shell(old))
    for path in sorted(hollow - before.traced - called - {""}, key=lambda p: -p.count(".")):
        try:  # a module whose tensors only folded values read (its forward never ran): a shell
            old = get_path(module, path)
        except AttributeError:
            continue
        if isinstance(old, nn.Module) and not isinstance(old, fx.GraphModule):
            set_path(module, path, _shell(old))
    for node in final:
        if node.op == "get_attr" and node.target in extras and not hasattr(module, node.target):
            value = extras[node.target]
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                module.register_buffer(node.target, value, persistent=False)
            else:
                setattr(module, node.target, value)
    install_forward(module, gm.graph)


def _shell(module: nn.Module) -> nn.Module:
    """A plain ``nn.Module`` with ``module``'s remaining state (its forward is no longer run and
    some of its weights were folded away, so it is no longer a working ``type(module)``)."""
    shell = nn.Module()
    for key, value in module.__dict__.items():
        if key in ("_parameters", "_buffers", "_modules"):
            shell.__dict__[key].update(value)
        elif key not in shell.__dict__ or not key.startswith("_"):
            shell.__dict__[key] = value
    return shell


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
        straight = _straight_line(module)
        if straight is None:
            return None
        children = straight
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
    segments: dict[int, tuple[str, Report]] = {}  # id of a child fused with its neighbours -> key, lines
    for key, child, lines in _trace_mixed_runs(list(seq._modules.items()), prefix, ctx):
        if lines is not None:  # already fused as one graph with its neighbours
            segments[id(child)] = (key, lines)
            items.append((key, child, None))
            continue
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
    merges: list[tuple[int, Merge]] = []
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
        ctx.report.merged(
            piece.kind, piece.sources, target, piece.before, piece.after, piece.note, piece.timing
        )
    new_key = {segments[id(child)][0]: key for key, child in out if id(child) in segments}
    for key, child in out:
        old_key, lines = segments.get(id(child), ("", None))
        if lines is None:
            continue
        for m in lines.merges:
            inside = prefix and m.target.startswith(prefix + ".")
            rel = m.target[len(prefix) + 1 :] if inside else m.target
            if isinstance(child, fx.GraphModule):  # targets live inside the GraphModule, now at ``key``
                rel = _join(key, rel)
            else:  # surgery on the children: targets start with a child's old key
                first, _, rest = rel.partition(".")
                rel = _join(new_key.get(first, first), rest) if rest else new_key.get(first, first)
            target = m.target if m.target == "(removed)" else _join(prefix, rel)
            ctx.report.merges.append(replace(m, target=target))
        ctx.report.declines += lines.declines
        ctx.report.notes += lines.notes
    if [(k, id(m)) for k, m in out] != [(k, id(m)) for k, m in seq._modules.items()] or segments:
        ctx.parts.append(seq)
    _explain_sequential(items, prefix, ctx)
    seq._modules.clear()
    seq._modules.update(OrderedDict(out))
    return seq


def _trace_mixed_runs(
    children: list[tuple[str, nn.Module]], prefix: str, ctx: _Context
) -> list[tuple[str, nn.Module, Report | None]]:
    """Children of a Sequential, where a run of known linear layers next to modules with their
    own forward (``Conv2d`` then timm's ``BatchNormAct2d``) is traced as one graph, so the
    layers merge across the child boundary; such a run becomes one GraphModule child, with the
    report lines of its fusing, when something merged, and is left to the child-by-child
    route (None) otherwise."""

    def kind(key: str, child: nn.Module) -> str:
        if isinstance(_linear_ops(child, _join(prefix, key), key), list):
            return "linear"
        custom = not type(child).__module__.startswith("torch.") and not isinstance(child, _CONTAINERS)
        return "custom" if custom and not _is_plain_sequential(child) else "other"

    kinds = [kind(key, child) for key, child in children]
    out: list[tuple[str, nn.Module, Report | None]] = []
    i = 0
    while i < len(children):
        if kinds[i] == "other":
            out.append((*children[i], None))
            i += 1
            continue
        lo = i
        while i < len(children) and kinds[i] != "other":
            i += 1
        seg = children[lo:i]
        fused = _fuse_segment(seg, prefix, ctx) if set(kinds[lo:i]) == {"linear", "custom"} else None
        if fused is None:
            out += [(key, child, None) for key, child in seg]
        else:
            new_children, lines = fused
            out += [
                (key, child, lines if j == 0 else Report()) for j, (key, child) in enumerate(new_children)
            ]
    return out


def _fuse_segment(
    seg: list[tuple[str, nn.Module]], prefix: str, ctx: _Context
) -> tuple[list[tuple[str, nn.Module]], Report] | None:
    """``seg`` traced and fused as one graph (layers named as in the Sequential): its children
    after surgery (each keeps its class) when every merge is a straight run of layer calls, else
    one GraphModule child, with the report lines; None when it does not trace or nothing merges
    (the child-by-child route then fuses and reports it)."""
    holder = nn.Sequential(OrderedDict(seg))
    for attempt in range(2):
        scratch = replace(ctx, report=Report(), untraced=[], seen=set(), parts=[])
        traced = _trace(holder, prefix, scratch, report=False)
        if traced is None:
            return None
        graph, extras, _ = traced
        with _from_fx(prefix, holder):
            gm = graph_module(holder, graph, extras, "Sequential")
            calls = _Before.of(graph)
            fuser = _GraphFuser(gm, prefix, scratch, None, aliased=_aliased(holder))
            if not fuser.run():
                return None
        inner = [s for s in fuser.inner_scopes() if id(get_path(holder, s)) not in ctx.descended]
        if attempt or not inner:
            break
        for scope in inner:  # new code inside one child: that child gets it, then fuse the run again
            child = get_path(holder, scope)
            ctx.descended.add(id(child))
            _fuse_any(child, _join(prefix, scope), ctx)
    ctx.seen |= scratch.seen
    ctx.parts += scratch.parts
    if fuser.straight:
        _write_back(holder, gm, fuser, calls, extras)
        return list(holder._modules.items()), scratch.report
    return [(seg[0][0], gm)], scratch.report


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
