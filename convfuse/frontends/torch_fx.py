"""PyTorch front end: ``fuse(module)`` merges every exact linear run of an ``nn.Module``.

An ``nn.Sequential`` (nested too) comes back as an ``nn.Sequential`` with merged layers in
place; any other module is traced with ``torch.fx`` and comes back as a ``GraphModule`` when
something merged. A module fx cannot trace (data-dependent control flow) keeps its own forward
and has its children fused one by one; the report says which modules were not traced.

This module finds regions and writes them back; :mod:`.torch_rules` says which layers are
linear, :mod:`.torch_ir` reduces a region with :mod:`convfuse.algebra`.

Real-world forms (timm): a layer subclass with its own forward is traced through (its
``F.batch_norm`` / ``F.conv2d`` call is read), rank reads (``x.ndim``, ``x.dim()``,
``len(x.shape)``) do not count as uses of a tensor and move to the region's input when the
tensor disappears (so ``torch._assert(x.ndim == 4)`` keeps checking the same rank), while reads
of the full shape keep the tensor and are reported; in-place sums on a fresh tensor are read
as sums and restored when they do not merge.
"""

from __future__ import annotations

import copy
import inspect
import operator
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils._pytree import tree_flatten

from ..decline import Decline, Reason
from ..errors import InvalidModelError, InvalidOptionError, TrainingModeError
from ..latency import DEFAULT_BUDGET, LatencyMeter, Timer
from ..policy import Judge, Policy
from ..report import ModelStats, Report
from .torch_ir import (
    Branches,
    ConvOp,
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
from .torch_layers import conv_from_spec, layer_types, mark_provenance
from .torch_rules import UNKNOWN, Terms, Unary, call_op, has_module_rule, module_op

__all__ = ["fuse", "fuse_with_report"]

_BATCHNORM = nn.modules.batchnorm._BatchNorm
_CONV = nn.modules.conv._ConvNd
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


# --------------------------------------------------------------------------- public API
def fuse(
    module: nn.Module,
    policy: Policy | str = "flops",
    return_report: bool = False,
    example_inputs: Any = None,
    *,
    device: str = "cpu",
    latency_budget: float = DEFAULT_BUDGET,
    timer: Timer | None = None,
) -> nn.Module | tuple[nn.Module, Report]:
    """A new module computing what ``module`` computes with its linear runs merged.

    An ``nn.Sequential`` comes back as an ``nn.Sequential``; another module as a
    ``torch.fx.GraphModule`` when something merged (else as a copy of itself); a module fx
    cannot trace keeps its forward and has its children fused (the report names it).
    ``policy``: ``"flops"`` (default) merges only what does not increase MACs or parameters,
    ``"always"`` every exact candidate, ``"latency"`` the candidates ONNX Runtime measures
    faster on ``device`` (``"cpu"`` or ``"cuda"``; the layers are timed as ONNX graphs built from
    their specs, a proxy for torch), timing for at most ``latency_budget`` seconds in all (then
    the flops rule); ``timer`` replaces the ONNX Runtime timer (:mod:`convfuse.latency`).
    ``example_inputs`` (a tensor or tuple) gives shapes to regions whose layers do not fix
    their channel count and to the latency timings, and lets the report count MACs and
    the output error. The caller's module is never modified; every conv left unmerged gets a report line
    saying why. Raises ``TrainingModeError`` for a BatchNorm (or subclass) in training mode and ``DeviceUnavailableError`` for ``device="cuda"`` without
    CUDA. Returns the module, or ``(module, report)`` with ``return_report=True``.
    """
    fused, report = fuse_with_report(
        module,
        policy=policy,
        example_inputs=example_inputs,
        device=device,
        latency_budget=latency_budget,
        timer=timer,
    )
    return (fused, report) if return_report else fused


def fuse_with_report(
    module: nn.Module,
    policy: Policy | str = "flops",
    example_inputs: Any = None,
    *,
    device: str = "cpu",
    latency_budget: float = DEFAULT_BUDGET,
    timer: Timer | None = None,
) -> tuple[nn.Module, Report]:
    """Like :func:`fuse`, always returning ``(module, report)``."""
    if not isinstance(module, nn.Module):
        hint = ""
        if isinstance(module, (str, os.PathLike, bytes)):
            hint = (
                "; convfuse reads no torch files (no pickles): build or load the module yourself, "
                "or use convfuse.fuse_onnx for an ONNX file"
            )
        raise InvalidModelError(f"fuse expects a torch.nn.Module, got {type(module).__name__}{hint}")
    try:
        policy = Policy.parse(policy)
    except ValueError as exc:
        raise InvalidOptionError(str(exc)) from None
    meter = LatencyMeter(device, latency_budget, timer=timer) if policy is Policy.LATENCY else None
    judge = Judge(policy, meter)
    _refuse_training_batchnorm(module)
    inputs = _as_inputs(example_inputs)
    report = Report()
    report.notes.append(f"policy: {policy.value}")
    report.before, ref_out = _stats(module, inputs, report)
    shapes = _input_shapes(module, inputs) if judge.times and inputs is not None else {}
    try:
        work = copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot work on a copy
        raise InvalidModelError(f"cannot copy {type(module).__name__} to fuse it: {exc}") from exc
    ctx = _Context(judge, report, inputs, shapes)
    with torch.no_grad():
        fused = _fuse_any(work, "", ctx, top=True)
    _explain_remaining_convs(module, ctx)
    report.after, out = _stats(fused, inputs, report)
    if ctx.untraced:
        report.notes.append(
            f"not traced by torch.fx (children fused separately): {', '.join(ctx.untraced)}"
        )
    if ref_out is not None and out is not None:
        report.notes.append(f"example_inputs: max relative output error {_relative_error(ref_out, out):.2e}")
    if judge.times:
        report.notes.append(
            "latency: torch layers timed as ONNX graphs built from their conv specs (a proxy for torch)"
        )
    report.notes.extend(judge.notes())
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


def _explain_remaining_convs(module: nn.Module, ctx: _Context) -> None:
    """The last guard against silent skips: every conv layer of ``module`` that no merge or
    decline names (nor a function call inside it, ``name:node``) gets a line saying why."""
    named = _named_sources(ctx.report)
    owners = {s.split(":", 1)[0] for s in named if ":" in s}
    root = type(module).__name__
    for name, m in module.named_modules():
        if not isinstance(m, _CONV) or name in named or name in owners:
            continue
        shown = name or root
        op = module_op(m, shown)
        if isinstance(op, Decline):
            ctx.report.declined((shown,), op)
            continue
        if op is None:
            ctx.report.declined(
                (shown,), Decline(Reason.UNSUPPORTED, f"convfuse has no rule for {type(m).__name__} layers")
            )
            continue
        parts = name.split(".") if name else []
        ancestors = [".".join(parts[:k]) or root for k in range(len(parts))]
        untraced = [a for a in ancestors if a in ctx.untraced]
        if untraced:
            why = f"it was fused on its own because torch.fx could not trace {untraced[-1]} (see that line)"
        elif not name:
            why = "the model is this one layer"
        elif name not in ctx.seen:
            why = "the traced forward never calls it"
        else:
            why = "no linear layer next to it was found"
        ctx.report.declined((shown,), Decline(Reason.NOTHING_TO_MERGE, f"nothing merged with it: {why}"))


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


_Args = tuple[tuple[tuple[int, ...], torch.dtype], ...]  # shape and dtype of each positional argument


def _input_shapes(module: nn.Module, inputs: tuple[Any, ...]) -> dict[str, _Args]:
    """Shape and dtype of the tensors each submodule reads on ``inputs`` (first call), by name.

    Only the top module is traced with ``inputs``; this is where the latency policy learns the
    shapes of Sequential runs and nested modules. Hooks are removed before returning; a module
    that fails to run gives no shapes, and a call with a non-tensor argument records nothing.
    """
    shapes: dict[str, _Args] = {}
    handles = []

    def record(name: str):  # noqa: ANN202 - a forward pre-hook
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if name in shapes or not args or not all(isinstance(a, torch.Tensor) for a in args):
                return
            shapes[name] = tuple((tuple(int(d) for d in a.shape), a.dtype) for a in args)

        return hook

    try:
        for name, sub in module.named_modules():
            if name:
                handles.append(sub.register_forward_pre_hook(record(name)))
        with torch.no_grad():
            module(*inputs)
    except Exception:  # noqa: BLE001 - shapes are optional; timings fall back to defaults
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return shapes


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
    judge: Judge
    report: Report
    inputs: tuple[Any, ...] | None
    shapes: dict[str, _Args] = field(default_factory=dict)  # module input shapes (latency)
    untraced: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # conv layers some fuser looked at


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
    tracer = _Tracer()
    try:
        gm = fx.GraphModule(module, tracer.trace(module), type(module).__name__)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to the children
        where = prefix or type(module).__name__
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        inside = ""
        if tracer.failed_in is not None and tracer.failed_in[0]:
            path, cls = tracer.failed_in
            inside = f" in {_join(prefix, path)} ({cls})"
        ctx.untraced.append(where)
        ctx.report.declined(
            (where,),
            Decline(
                Reason.UNTRACEABLE,
                f"torch.fx cannot trace {type(module).__name__}{inside} ({first_line}); its forward is kept "
                "and its children were fused separately",
            ),
        )
        _fuse_children(module, prefix, ctx)
        return module
    changed = _GraphFuser(gm, prefix, ctx, ctx.inputs if top else None).run()
    return gm if changed else module


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps layers the rule tables know whole (a BatchNorm subclass that
    keeps the base forward is one layer, not its ``_check_input_dim`` control flow), traces
    through everything else (a subclass with its own forward), and remembers the innermost
    module whose forward could not be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or has_module_rule(m)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module raises first
                try:
                    path = self.path_of_module(m)
                except NameError:  # a module that is not an attribute of the root
                    path = "?"
                self.failed_in = (path, type(m).__name__)
            raise


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
    segments: dict[int, Report] = {}  # id of a GraphModule fused from several children -> its lines
    for key, child, lines in _trace_mixed_runs(list(seq._modules.items()), prefix, ctx):
        if lines is not None:  # already fused as one graph with its neighbours
            segments[id(child)] = lines
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
        ctx.report.merged(piece.kind, piece.sources, target, piece.before, piece.after, piece.note, piece.timing)
    for key, child in out:
        lines = segments.get(id(child))
        if lines is not None:  # merge targets live inside the GraphModule, now at ``key``
            for m in lines.merges:
                inside = prefix and m.target.startswith(prefix + ".")
                rel = m.target[len(prefix) + 1 :] if inside else m.target
                target = m.target if m.target == "(removed)" else _join(prefix, _join(key, rel))
                ctx.report.merges.append(replace(m, target=target))
            ctx.report.declines += lines.declines
            ctx.report.notes += lines.notes
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
        out += [(key, child, None) for key, child in seg] if fused is None else [(seg[0][0], *fused)]
    return out


def _fuse_segment(
    seg: list[tuple[str, nn.Module]], prefix: str, ctx: _Context
) -> tuple[fx.GraphModule, Report] | None:
    """``seg`` traced and fused as one graph (layers named as in the Sequential) with its
    report lines, or None when it does not trace or nothing merges (the child-by-child route
    then fuses and reports it)."""
    holder = nn.Sequential(OrderedDict(seg))
    try:
        gm = fx.GraphModule(holder, _Tracer().trace(holder), "Sequential")
    except Exception:  # noqa: BLE001 - the child-by-child route reports why
        return None
    scratch = replace(ctx, report=Report(), untraced=[], seen=set())
    if not _GraphFuser(gm, prefix, scratch, None).run():
        return None
    ctx.seen |= scratch.seen
    return gm, scratch.report


def _explain_sequential(
    items: list[tuple[str, nn.Module, list[LinearOp] | Decline | None]], prefix: str, ctx: _Context
) -> None:
    """Every conv of a Sequential's linear runs that no report line names gets one saying why:
    its run folds to no fewer layers, between layers convfuse does not read as linear."""
    named = _named_sources(ctx.report)
    where = f"Sequential {prefix!r}" if prefix else "the Sequential"

    def layer(i: int) -> str:
        key, child, _ = items[i]
        return f"{_join(prefix, key)} ({type(child).__name__})"

    def not_linear(n: int) -> str:
        return "which convfuse does not read as a linear layer" if n == 1 else "neither read as linear by convfuse"

    i = 0
    while i < len(items):
        if not isinstance(items[i][2], list):
            i += 1
            continue
        lo = i
        while i < len(items) and isinstance(items[i][2], list):
            i += 1
        ops = [op for _, _, run_ops in items[lo:i] for op in run_ops]
        convs = [op for op in ops if isinstance(op, ConvOp)]
        ctx.seen.update(op.name for op in convs)
        before = f"after {layer(lo - 1)}" if lo > 0 else f"at the start of {where}"
        after = f"before {layer(i)}" if i < len(items) else f"at the end of {where}"
        place = f"{before} and {after}" if lo > 0 or i < len(items) else f"alone in {where}"
        if len(ops) == 1:
            around = f"nothing linear next to it: it sits {place}"
        else:
            names = ", ".join(op.name for op in ops)
            place = place.replace("alone in", "all of")
            around = f"its linear run ({names}) folds to no fewer layers; the run sits {place}"
        neighbours = int(lo > 0) + int(i < len(items))
        for op in convs:
            if op.name not in named:
                message = around + (f", {not_linear(neighbours)}" if neighbours else "")
                ctx.report.declined((op.name,), Decline(Reason.NOTHING_TO_MERGE, message))


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
    args = ctx.shapes.get(steps[0].name)
    shape = args[0][0] if args else None
    if shape is not None and len(shape) == info.ndim + 2 and shape[1] == info.channels:
        info = replace(info, batch=shape[0], spatial=shape[2:])
    red = reduce_region(steps, info, ctx.judge, ctx.report)
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
            types = {op.name: type(op.origin[1]).__name__ for op in steps}
            merged = mark_provenance(conv_from_spec(piece.spec, piece.dtype, piece.device), piece.sources, piece.kind, types)
            out.append((key_of[piece.sources[0]], merged))
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


_INPLACE_SUM_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub,
                          operator.imul: operator.mul, operator.itruediv: operator.truediv}  # fmt: skip
_INPLACE_SUM_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}


def _functional_form(node: fx.Node) -> Any:
    """The out-of-place target of an in-place sum or scaling (``t += u``, ``t.add_(u)``), or None."""
    if node.op == "call_method":
        return _INPLACE_SUM_METHODS.get(node.target)
    if node.op == "call_function":
        try:
            return _INPLACE_SUM_FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def _shape_read(node: fx.Node) -> str:
    """``".shape"`` / ``".size()"`` / ``".numel()"`` when ``node`` reads a tensor's shape, else ``""``."""
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return ".shape"
    if node.op == "call_method" and node.target in ("size", "numel", "nelement"):
        return f".{node.target}()"
    return ""


def _qualified(target: Any) -> str:
    """``torch.nn.functional.batch_norm``, ``torch.tanh``, ``operator.add``: a called function
    by the public name a reader knows."""
    name = getattr(target, "__name__", None) or repr(target)
    for where, namespace in (("torch", torch), ("torch.nn.functional", F), ("operator", operator)):
        if getattr(namespace, name, None) is target:
            return f"{where}.{name}"
    module = getattr(target, "__module__", None) or ""
    qualname = getattr(target, "__qualname__", None) or name
    return f"{module}.{qualname}" if module and module != "builtins" else qualname


def _named_sources(report: Report) -> set[str]:
    """Every layer name a merge or decline line of ``report`` mentions."""
    named = {s for m in report.merges for s in m.sources}
    named |= {s for d in report.declines for s in d.sources}
    return named


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
        self.owners: dict[str, list[str]] = {}  # function-call name -> path of the module it runs in
        self.functionalized: dict[fx.Node, Any] = {}  # in-place sum -> its original target
        self.changed = False
        self._const_cache: dict[fx.Node, Any] = {}
        args = ctx.shapes.get(prefix) if inputs is None and prefix else None
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if args is not None and len(args) == len(placeholders):
            # A nested module under the latency policy: its recorded input shapes, as zeros.
            inputs = tuple(torch.zeros(shape, dtype=dtype) for shape, dtype in args)
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
        """Read every node as a linear op, a sum, or a reason; in-place sums become sums first."""
        declined = self._classify()
        if self._functionalize():
            declined = self._classify()
        for node, decline in declined.items():
            near = list(node.all_input_nodes) + list(node.users)
            if any(n in self.entries for n in near):
                self.ctx.report.declined((self._node_name(node),), decline)

    def _classify(self) -> dict[fx.Node, Decline]:
        """Fill ``entries``; return the nodes whose rule declined."""
        self.entries = {}
        declined: dict[fx.Node, Decline] = {}
        for node in self.nodes:
            entry: Any = None
            if node.op == "call_module":
                module = self.gm.get_submodule(node.target)
                if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
                    op = module_op(module, self._name(node.target))
                    entry = Unary(op, node.args[0]) if isinstance(op, LinearOp) else op
                    self.module_names.add(self._name(node.target))
                if isinstance(module, _CONV):
                    self.ctx.seen.add(self._name(node.target))
            elif node.op in ("call_function", "call_method"):
                entry = call_op(node, self._resolve)
                if isinstance(entry, Unary):
                    entry.op.name = self._node_name(node)
            if isinstance(entry, Decline):
                declined[node] = entry
            elif entry is not None:
                if isinstance(entry, Unary):
                    entry.op.origin = node
                self.entries[node] = entry
        return declined

    def _node_name(self, node: fx.Node) -> str:
        """A module call by its path; a function call inside a traced-through module as
        ``<module path>:<node>`` (``conv_1x1.bn:batch_norm_1``), else by its node name."""
        if node.op == "call_module":
            return self._name(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        owner = str(list(stack.values())[-1][0]) if stack else ""
        path = _join(self.prefix, owner)
        if not path or node.op not in ("call_function", "call_method"):
            return node.name
        name = f"{path}:{node.name}"
        self.owners[name] = owner.split(".") if owner else []
        return name

    # ------------------------------------------------------------------ in-place sums
    def _fresh(self, node: fx.Node) -> bool:
        """Whether ``node`` surely returns a new tensor (not its input or a view of it)."""
        if node in self.functionalized:
            return True
        entry = self.entries.get(node)
        if isinstance(entry, Terms):
            return True
        return isinstance(entry, Unary) and not isinstance(entry.op, IdentityOp) and not _is_view(node)

    def _functionalize(self) -> bool:
        """Read in-place sums (``t.add_(u)``, ``operator.iadd``; also ``sub_``/``mul_``/``div_``) as
        their out-of-place forms when that is safe, so they can join a linear region.

        Safe when ``t`` is a new tensor (a conv, BN, sum... output: nothing else shares its memory)
        and nothing read ``t`` before the write except its rank (so no earlier alias sees the
        write); later readers of ``t`` are pointed at the sum, which holds the same values. A
        rewritten node that does not end up merged is turned back into its in-place form.
        """
        for node in self.nodes:
            functional = _functional_form(node)
            if functional is None:
                continue
            target = node.args[0] if node.args else None
            if not isinstance(target, fx.Node):
                node.target = functional  # ``0 += t``: nothing is written in place
                continue
            earlier = [u for u in target.users if u is not node and self.order[u] < self.order[node]]
            if not self._fresh(target) or any(not self._rank_read(u) for u in earlier):
                continue
            self.functionalized[node] = node.target
            node.target = functional
            for user in list(target.users):
                if user is not node and self.order[user] > self.order[node]:
                    user.replace_input_with(target, node)
        return bool(self.functionalized)

    def _restore_inplace(self) -> None:
        """Functionalized sums left in the graph go back to their in-place form (dtype and
        aliasing exactly as the model wrote them)."""
        for node, target in self.functionalized.items():
            if not getattr(node, "_erased", False):
                node.target = target

    # ------------------------------------------------------------------ shape reads
    def _rank_read(self, node: fx.Node) -> bool:
        """``t.ndim``, ``t.dim()``, ``len(t.shape)``: reads only the rank, which every op of a
        linear region keeps, so the read can move to the region's input."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("ndim",):
            return True
        if node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1:
            return True
        read = _shape_read(node)
        if read == ".shape" or (read == ".size()" and len(node.args) == 1 and not node.kwargs):
            return all(u.op == "call_function" and u.target is len for u in node.users)
        return False

    def _users(self, node: fx.Node) -> list[fx.Node]:
        """Users of ``node`` that read its values (rank reads left out)."""
        return [u for u in node.users if not self._rank_read(u)]

    def _anchor(self, node: fx.Node, nodes: set[fx.Node]) -> fx.Node:
        """The tensor outside ``nodes`` that ``node`` was computed from (same rank)."""
        while node in nodes:
            entry = self.entries[node]
            node = entry.input if isinstance(entry, Unary) else entry.terms[0][0]
        return node

    def _move_rank_reads(self, nodes: set[fx.Node], root: fx.Node) -> None:
        """Point rank reads of tensors about to disappear at the region's input (same rank)."""
        for node in nodes:
            if node is root:
                continue
            for user in list(node.users):
                if self._rank_read(user):
                    user.replace_input_with(node, self._anchor(node, nodes))

    def _expr(self, node: fx.Node, top: bool) -> tuple[fx.Node, list[Step], set[fx.Node]]:
        """The longest linear expression ending at ``node``: (source, steps, nodes absorbed).

        A tensor is absorbed when its only user is in the expression; branches of a sum must
        reach one source, and the expression goes on past that source when every user of it is
        inside.
        """
        entry = self.entries.get(node)
        if entry is None or (not top and len(self._users(node)) != 1):
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
        if src in self.entries and all(u in nodes for u in self._users(src)):
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
            red = reduce_region(steps, info, self.ctx.judge, self.ctx.report)
            if isinstance(red, Decline):
                self.ctx.report.declined(names, red)
                continue
            if red.changed:
                self._write(root, src, red.pieces, nodes)
        self._explain_unmerged()
        if self.changed:
            self._restore_inplace()
            self._clean()
        return self.changed

    def _info(self, src: fx.Node, steps: list[Step]) -> TensorInfo | None:
        meta = src.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            return region_info(steps, tuple(meta.shape), meta.dtype)
        return region_info(steps)

    def _flat_terms(
        self, node: fx.Node, strict: bool = False
    ) -> tuple[list[tuple[fx.Node, list[LinearOp]]], set[fx.Node]]:
        """The terms of a sum, with nested sums used only here flattened into it (``strict``:
        not even a rank read, for sums of different tensors whose ranks may differ)."""
        out: list[tuple[fx.Node, list[LinearOp]]] = []
        nodes = {node}
        for inp, tail in self.entries[node].terms:
            users = inp.users if strict else self._users(inp)
            if isinstance(self.entries.get(inp), Terms) and len(users) == 1:
                inner, more = self._flat_terms(inp, strict)
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
        terms, nodes = self._flat_terms(root, strict=True)
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
                red = reduce_region(steps, info, self.ctx.judge, self.ctx.report)
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
        outside = [u for u in self._users(src) if u not in nodes]
        if not outside:
            return
        self.shared_reported.add(src)
        inside = [self._node_name(u) for u in src.users if u in nodes]
        users = ", ".join(self._describe(u) for u in outside)
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
            writes = _is_inplace(node, self.gm) or node in self.functionalized  # restored if not merged
            if writes and any(i in aliases for i in node.all_input_nodes):
                return Decline(
                    Reason.UNSUPPORTED,
                    f"{self._node_name(node)} modifies a tensor this linear region reads, in place, "
                    "between two of its reads",
                )
        return None

    # ------------------------------------------------------------------ explaining
    def _describe(self, node: fx.Node) -> str:
        """A node as a reader sees it in a report line."""
        if node.op == "output":
            return "the model output"
        if node.op == "placeholder":
            return f"the input {node.target!r}"
        if node.op == "get_attr":
            return f"the constant {node.target}"
        if node.op == "call_module":
            return f"{self._node_name(node)} ({type(self.gm.get_submodule(node.target)).__name__})"
        read = _shape_read(node)
        if read:
            return f"{self._node_name(node)} (reads its {read}, which a merge cannot keep for this tensor)"
        if node.op == "call_method":
            return f"{self._node_name(node)} (.{node.target}())"
        return f"{self._node_name(node)} ({_qualified(node.target)})"

    def _explain_unmerged(self) -> None:
        """Every conv this graph kept as it was, and no report line names, gets one saying why.

        Reads the neighbours in the graph as traced: what feeds the conv and what reads it,
        and which of those convfuse does not read as linear ops.
        """
        named = _named_sources(self.ctx.report)
        for node in self.nodes:
            entry = self.entries.get(node)
            if not isinstance(entry, Unary) or not isinstance(entry.op, ConvOp) or entry.op.name in named:
                continue
            src, users = entry.input, self._users(node)
            src_users = self._users(src)
            linear_src = src in self.entries and src.op != "placeholder"
            linear_near = linear_src or any(u in self.entries for u in users)
            first = f"its input comes from {self._neighbour(src)}"
            if linear_src and len(src_users) > 1:
                others = ", ".join(self._describe(u) for u in src_users if u is not node)
                first += f", which is also read by {others}"
            if users:
                second = "its output goes to " + "; ".join(self._neighbour(u) for u in users)
            else:
                second = "its output is unused"
            if any(u.op == "output" for u in users) and linear_near:
                reason = Reason.GRAPH_OUTPUT
            elif linear_near and (len(users) > 1 or len(src_users) > 1):
                reason = Reason.SHARED_TENSOR
            else:
                reason = Reason.NOTHING_TO_MERGE
            message = f"nothing merged with it: {first}; {second}"
            self.ctx.report.declined((entry.op.name,), Decline(reason, message))

    def _neighbour(self, node: fx.Node) -> str:
        """A conv's neighbour described, with why convfuse does not fold across it."""
        text = self._describe(node)
        if node in self.entries or node.op not in ("call_module", "call_function", "call_method"):
            return text
        if _functional_form(node) is not None:
            return text + ", an in-place write (a sum only when nothing but rank reads used its target before)"
        return text if _shape_read(node) else text + ", which convfuse does not read as a linear op"

    # ------------------------------------------------------------------ write back
    def _write(self, root: fx.Node, src: fx.Node, pieces: list[Piece], nodes: set[fx.Node]) -> None:
        with self.graph.inserting_before(root):
            out = self._emit(pieces, src)
        self._replace(root, out, nodes)

    def _replace(self, root: fx.Node, out: fx.Node, nodes: set[fx.Node]) -> None:
        root.replace_all_uses_with(out)
        self._move_rank_reads(nodes, root)
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
                types = layer_types(self.gm, piece.sources, self.prefix)
                merged = mark_provenance(conv_from_spec(piece.spec, piece.dtype, piece.device), piece.sources, piece.kind, types)
                self.gm.add_submodule(target, merged)
                value = self.graph.call_module(target, (value,))
                self.ctx.report.merged(
                    piece.kind, piece.sources, self._name(target), piece.before, piece.after, piece.note, piece.timing
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
            elif s in self.owners:  # a function call: it lives in the module that called it
                parents.append(self.owners[s])
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
            elif self._const(node) is not UNKNOWN or self._rank_read(node):
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
