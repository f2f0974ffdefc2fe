"""PyTorch front end: ``fuse(module)`` merges every exact linear run of an ``nn.Module``.

The returned module is the caller's model (a copy), not a rewrite of it: every module keeps its
class, attributes, methods, buffers, hooks and ``training`` flag. An ``nn.Sequential`` its parent
calls as a whole has its runs merged in place (a Sequential whose children the parent calls one
by one, as routing loops do, is fused child by child). Any other module is traced with
``torch.fx`` (:func:`.torch_surgery.trace_restoring`: tracing never changes it) and written back
by surgery when every merge is a straight run of layer calls, or given a generated forward on a
subclass of its own class, as deep in the tree as the merge allows (:mod:`.torch_surgery` says
which happens when). A module fx cannot trace (data-dependent control flow) keeps its own
forward and has its children fused one by one; the report says which modules were not traced.
Before returning, :mod:`.torch_check` runs the result next to the original and puts back any
module that raises or differs (reason ``self-check``).

This module imports a graph to the planner's IR (:mod:`.torch_import`; :mod:`.torch_rules` says
which layers and calls are linear) and writes :func:`convfuse.planner.plan`'s result back.

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
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils._pytree import tree_flatten, tree_map

from ...decline import Decline, Reason
from ...errors import (
    ConvfuseError,
    InternalError,
    InvalidModelError,
    InvalidOptionError,
    TorchFxError,
    TrainingModeError,
    internal_message,
    one_line,
)
from ...ir import REGROUP, LinearGraph, LinearNode, OpKind
from ...latency import judge_for
from ...planner import Merge, Plan, Resum, plan
from ...policy import Judge, Policy
from ...report import ModelStats, Report
from ...timing import DEFAULT_BUDGET, Timer
from ...transpose import ConvTransposeSpec
from .capture import CaptureMixin
from .check import (
    Batches,
    Part,
    candidate_inputs,
    infer_example_input,
    put_back_failures,
    quiet,
    random_like,
    run_quietly,
    sequentials_called_whole,
)
from .fill import read_borders
from .fold import FoldResult, StateValues, drop_dead_state, fold_state
from .importer import op_node, parameter_sizes
from .layers import conv_from_spec, layer_types, linear_from_spec, mark_provenance
from .ops import ConvOp, IdentityOp, LinearOp, numpy_dtype, weight_dtype_device
from .ring import BorderConv, border_conv
from .rules import UNKNOWN, Cat, Terms, Unary, call_op, has_module_rule, module_op
from .surgery import absorbed as placeholder
from .surgery import (
    carry_attributes,
    get_path,
    graph_module,
    has_hooks,
    install_forward,
    replace_layer,
    set_path,
    trace_restoring,
)
from .transpose import conv_transpose_from_spec

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
    check: bool = True,
) -> nn.Module | tuple[nn.Module, Report]:
    """A new module computing what ``module`` computes with its linear runs merged.

    The result keeps the input's classes, attributes, methods, buffers, hooks and ``training``
    flags (see :mod:`.torch_surgery` for which modules get new code and when); an
    ``nn.Sequential`` called as a whole comes back with merged layers in place; a module fx
    cannot trace keeps its forward and has its children fused (the report names it).
    ``policy``: ``"flops"`` (default) merges only what does not increase MACs or parameters,
    ``"always"`` every exact candidate, ``"latency"`` the candidates ONNX Runtime measures
    faster on ``device`` (``"cpu"`` or ``"cuda"``; the layers are timed as ONNX graphs built from
    their specs, a proxy for torch), timing for at most ``latency_budget`` seconds in all (then
    the flops rule); ``timer`` replaces the ONNX Runtime timer (:mod:`convfuse.latency`).
    ``example_inputs`` (a tensor or tuple) gives shapes to regions whose layers do not fix
    their channel count and to the latency timings, and lets the report count MACs and
    the output error. Before returning, the fused module is run next to the original on the
    example inputs and a second random batch of their shape (without them, on an input inferred
    for a model that starts with a conv); a part that raises or differs is put back as it was
    (reason ``self-check``) and the report says when no check could run; ``check=False`` skips
    it. The caller's module is never modified nor run; every conv left unmerged gets a report
    line saying why. Raises ``TrainingModeError`` for a BatchNorm (or subclass) in training mode,
    ``DeviceUnavailableError`` for ``device="cuda"`` without CUDA, ``TorchFxError`` when torch.fx
    fails on a module, ``InternalError`` for anything convfuse did not expect. Returns the
    module, or ``(module, report)`` with ``return_report=True``.
    """
    fused, report = fuse_with_report(
        module,
        policy=policy,
        example_inputs=example_inputs,
        device=device,
        latency_budget=latency_budget,
        timer=timer,
        check=check,
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
    check: bool = True,
) -> tuple[nn.Module, Report]:
    """Like :func:`fuse`, always returning ``(module, report)``."""
    try:
        return _fuse_with_report(module, policy, example_inputs, device, latency_budget, timer, check)
    except ConvfuseError:
        raise
    except Exception as exc:  # noqa: BLE001 - one error family: anything else is a bug in convfuse
        raise InternalError(internal_message(exc)) from exc


def _fuse_with_report(
    module: nn.Module,
    policy: Policy | str,
    example_inputs: Any,
    device: str,
    latency_budget: float,
    timer: Timer | None,
    check: bool,
) -> tuple[nn.Module, Report]:
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
    judge = judge_for(policy, device, latency_budget, timer)  # the ORT timer under latency
    _refuse_training_batchnorm(module)
    inputs = _as_inputs(example_inputs)
    report = Report()
    report.notes.append(f"policy: {policy.value}")
    try:
        reference = copy.deepcopy(module)  # convfuse runs copies only, never the caller's module
        work = copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot work on a copy
        raise InvalidModelError(f"cannot copy {type(module).__name__} to fuse it: {exc}") from exc
    report.before, ref_out = _stats(reference, inputs, report)
    batches = _batches(reference, inputs, report) if check else None
    if not check:
        report.notes.append("self-check: skipped (check=False)")
    probe = batches.inputs[0] if batches is not None else inputs or infer_example_input(reference)
    # Linear layers need ranks (BatchNorm1d and reshapes next to them): shapes on the example
    # inputs, else on the input inferred from the first conv (which fixes the input's rank, so
    # the ranks seen inside hold at every size; its sizes are not used).
    ranks = any(isinstance(m, nn.Linear) for m in reference.modules())
    shapes: dict[str, _Args] = {}
    if inputs is not None or (ranks and probe is not None):  # example inputs: latency, border rings
        shapes = _input_shapes(reference, inputs or probe)
    whole = None  # which Sequentials their parents call as a whole: seen on a run of a copy
    if probe is not None:
        paths = sequentials_called_whole(reference, probe)
        if paths is not None:
            named = dict(work.named_modules())
            whole = {id(named[p]) for p in paths if p in named}
    ctx = _Context(
        judge, report, inputs or (probe if ranks else None), shapes, whole=whole, inferred=inputs is None
    )
    originals = {id(w): (o, name) for (name, o), w in zip(module.named_modules(), work.modules())}
    with torch.no_grad():
        fused = _fuse_any(work, "", ctx, top=True)
    if batches is not None:
        fused = _self_check(module, fused, ctx, batches, originals)
    _explain_remaining_convs(module, ctx)
    report.after, out = _stats(copy.deepcopy(fused) if inputs is not None else fused, inputs, report)
    if ctx.untraced:
        report.notes.append(f"not traced by torch.fx (children fused separately): {', '.join(ctx.untraced)}")
    if ctx.split:
        report.notes.append(
            "fused child by child, not called as a whole by their parent: " + ", ".join(ctx.split)
        )
    if ref_out is not None and out is not None:
        report.notes.append(f"example_inputs: max relative output error {_relative_error(ref_out, out):.2e}")
    if judge.times:
        report.notes.append(
            "latency: torch layers timed as ONNX graphs built from their conv specs (a proxy for torch)"
        )
    report.notes.extend(judge.notes())
    return fused, report


def _batches(reference: nn.Module, inputs: tuple[Any, ...] | None, report: Report) -> Batches | None:
    """The self-check's two batches and the original's outputs on them, or None (noted)."""
    source = "example inputs"
    if inputs is None:
        source = "an inferred input"
        candidates = candidate_inputs(reference)
        if not candidates:
            report.notes.append(
                "self-check: not run (no example_inputs, and the model does not start with a conv "
                "to infer an input from); pass example_inputs to check the fused module"
            )
            return None
        for inputs in candidates:  # the smallest size the model runs at
            try:
                run_quietly(reference, inputs)
                break
            except Exception:  # noqa: BLE001 - the next size, or the note below
                continue
    batch = [inputs, random_like(inputs)]
    try:
        refs = [_detached(run_quietly(reference, b)) for b in batch]
        ok, _, why = Batches([batch[0]], [refs[0]], source).check(reference)  # dropout, torch.rand...
        if not ok:
            raise RuntimeError(f"it gives different outputs on the same input ({why})")
    except Exception as exc:  # noqa: BLE001 - the original itself does not run: nothing to check
        report.notes.append(
            f"self-check: not run (the original module fails on {source}: {one_line(exc, 200)})"
        )
        return None
    return Batches(batch, refs, source)


def _detached(out: Any) -> Any:
    """``out`` with every tensor copied (a model may return a buffer it later updates in place)."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, out)


def _self_check(
    module: nn.Module,
    fused: nn.Module,
    ctx: _Context,
    batches: Batches,
    originals: dict[int, tuple[nn.Module, str]],
) -> nn.Module:
    """Run ``fused`` next to the original; put back every part that raises or differs."""
    parts = [Part(m, *originals[id(m)]) for m in ctx.parts if id(m) in originals]
    fused, failed = put_back_failures(module, fused, parts, batches.check)
    for part, why in failed:
        where = part.path or type(module).__name__
        ctx.report.merges = [m for m in ctx.report.merges if not _under(m.sources, part.path)]
        ctx.report.declined(
            (where,),
            Decline(
                Reason.SELF_CHECK,
                f"the fused {type(part.original).__name__} {why}; it was put back as it was",
            ),
        )
        ctx.checked_back.append(part.path)
    ok, err, why = batches.check(copy.deepcopy(fused))  # copyable: put_back_failures checked a copy
    shape = ", ".join(str(tuple(t.shape)) for t in batches.inputs[0] if isinstance(t, torch.Tensor))
    if ok:
        ctx.report.notes.append(
            f"self-check: fused and original agree on {batches.source} {shape} and a second random batch "
            f"(max relative error {err:.2e})"
        )
    else:  # only the original itself can fail here (put_back_failures returned a copy of it)
        ctx.report.notes.append(f"self-check: the original model itself does not repeat its outputs ({why})")
    return fused


def _under(sources: Iterable[str], path: str) -> bool:
    """Whether some layer of ``sources`` lies inside the module at ``path``."""
    if not path:
        return True
    return any(s.split(":", 1)[0] == path or s.split(":", 1)[0].startswith(path + ".") for s in sources)


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
        back = [a for a in ancestors + [name] if (a if a != root else "") in ctx.checked_back]
        split = [a for a in ancestors if a in ctx.split or (a == root and "the model" in ctx.split)]
        if back:
            ctx.report.declined(
                (shown,),
                Decline(
                    Reason.SELF_CHECK, f"{back[-1]} was put back as it was by the self-check (see that line)"
                ),
            )
            continue
        if split and (not untraced or ancestors.index(split[-1]) > ancestors.index(untraced[-1])):
            why = (
                f"its parent calls the layers of Sequential {split[-1]} one by one rather than the Sequential "
                "as a whole, so they are not merged across its children"
            )
        elif untraced:
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
        with quiet(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
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

    with quiet(module):
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
    err = max(
        (float((a.double() - b.double()).abs().max()) for a, b in zip(ref_leaves, out_leaves) if a.numel()),
        default=0.0,
    )
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
    whole: set[int] | None = None  # ids of Sequentials seen called as a whole (None: not observed)
    parts: list[nn.Module] = field(default_factory=list)  # modules changed at their own level
    split: list[str] = field(default_factory=list)  # Sequentials fused child by child
    checked_back: list[str] = field(default_factory=list)  # parts the self-check put back
    descended: set[int] = field(default_factory=set)  # children fused on their own for a parent
    inferred: bool = False  # shapes come from an inferred input: only ranks and channels are told

    def known(self, shape: tuple[int, ...]) -> tuple[int | None, ...]:
        """A recorded shape as the planner may use it: from an inferred input, its rank and its
        channels (dim 1); the sizes, which hold at that input only, unknown."""
        if not self.inferred:
            return shape
        return tuple(d if k == 1 else None for k, d in enumerate(shape))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


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


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps layers the rule tables know whole (a BatchNorm subclass that
    keeps the base forward is one layer, not its ``_check_input_dim`` control flow) and modules
    with hooks (so their hooks run, and are never traced with Proxies), traces through everything
    else (a subclass with its own forward), and remembers the innermost module whose forward
    could not be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = super().is_leaf_module(m, module_qualified_name) or has_module_rule(m) or has_hooks(m)
        return leaf or isinstance(m, BorderConv)  # a fused case-2 merge: kept whole, never re-traced

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


class _CaptureTracer(CaptureMixin, _Tracer):
    """The tracer of last resort: item assignment and decisions on module state (:mod:`.capture`)."""


def _fuse_children(module: nn.Module, prefix: str, ctx: _Context) -> None:
    """Fuse each child on its own (the parent's forward is kept): a Sequential child is merged
    across its children only when it was seen called as a whole."""
    for name, child in list(module.named_children()):
        whole = ctx.whole is not None and id(child) in ctx.whole
        new = _fuse_any(child, _join(prefix, name), ctx, whole=whole)
        if new is not child:
            setattr(module, name, new)


def _trace(
    module: nn.Module, prefix: str, ctx: _Context, report: bool = True
) -> tuple[fx.Graph, dict[str, Any], dict[str, list[str]]] | None:
    """``module``'s graph, tracer constants and attribute writes, the module restored as it
    was; None (reported when ``report``) when torch.fx cannot trace it."""
    tracer = _Tracer()
    try:
        return trace_restoring(tracer, module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to the children
        captured = _capture(module, prefix, ctx, exc, report)
        if captured is not None:
            return captured
        if not report:
            return None
        where = prefix or type(module).__name__
        inside = ""
        if tracer.failed_in is not None and tracer.failed_in[0]:
            path, cls = tracer.failed_in
            inside = f" in {_join(prefix, path)} ({cls})"
        ctx.untraced.append(where)
        ctx.report.declined(
            (where,),
            Decline(
                Reason.UNTRACEABLE,
                f"torch.fx cannot trace {type(module).__name__}{inside} ({one_line(exc, 200)}); its forward is "
                "kept and its children were fused separately",
            ),
        )
        return None


def _capture(
    module: nn.Module, prefix: str, ctx: _Context, exc: Exception, report: bool
) -> tuple[fx.Graph, dict[str, Any], dict[str, list[str]]] | None:
    """``module`` traced by :class:`_CaptureTracer` where symbolic tracing raised ``exc``; None
    when that fails too (the caller reports the first failure)."""
    tracer = _CaptureTracer()
    try:
        traced = trace_restoring(tracer, module)
    except Exception:  # noqa: BLE001 - untraceable after all
        return None
    if report:
        where = prefix or type(module).__name__
        note = (
            f"captured {where} without symbolic tracing (torch.fx: {one_line(exc, 120)}): item assignment "
            f"recorded, {len(tracer.decisions)} decision(s) on module state taken as every call takes them"
        )
        if note not in ctx.report.notes:
            ctx.report.notes.append(note)
    return traced


def _prepare(gm: fx.GraphModule, extras: dict[str, Any], prefix: str, ctx: _Context) -> FoldResult:
    """Fold state-only values into constants (:mod:`.fold`), then read bias-filled borders as zero
    pads (:mod:`.fill`), in ``gm``'s graph before it is imported; declines reported, the moved
    borders kept in ``result.moved`` (reported once the graph is written back)."""
    folded = fold_state(gm, extras, "folded")
    extras.update(folded.new)
    borders = read_borders(gm, StateValues(gm))
    if folded.folded or borders.moved:
        drop_dead_state(gm, extras)
    for sources, decline in folded.declines + borders.declines:
        ctx.report.declined(tuple(_join(prefix, s) for s in sources), decline)
    folded.moved = borders.moved
    return folded


def _report_prepared(prepared: FoldResult, prefix: str, ctx: _Context) -> None:
    from ...algebra import Cost

    for f in prepared.folded:
        sources = tuple(_join(prefix, s) for s in f.reads) or (_join(prefix, f.source),)
        ctx.report.merged(
            "fold",
            sources,
            _join(prefix, f.target),
            Cost(0, f.params_before),
            Cost(0, f.params_after),
            f"computed from module state only ({f.source}), stored once",
        )
    for m in prepared.moved:
        ctx.report.merged(
            "border",
            tuple(_join(prefix, s) for s in (m.layer, m.pad, *m.writes)),
            _join(prefix, m.layer),
            Cost(0, 0),
            Cost(0, 0),
            "ring written with the layer's zero response: a zero pad before the layer",
        )


def _from_fx(prefix: str, module: nn.Module):  # noqa: ANN202 - a context manager
    """torch.fx failures while rewriting ``module`` as a :class:`TorchFxError` naming it."""
    from contextlib import contextmanager

    @contextmanager
    def guard():  # noqa: ANN202
        try:
            yield
        except ConvfuseError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted below: fx's own failures vs convfuse bugs
            tb = exc.__traceback__
            frames = []
            while tb is not None:
                frames.append(tb.tb_frame.f_code.co_filename)
                tb = tb.tb_next
            if any(f"torch{os.sep}fx{os.sep}" in f for f in frames):
                where = prefix or type(module).__name__
                raise TorchFxError(
                    f"torch.fx failed while convfuse rewrote {where} ({type(module).__name__}): "
                    f"{type(exc).__name__}: {one_line(exc, 300)}"
                ) from exc
            raise

    return guard()


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
        return (
            "which convfuse does not read as a linear layer"
            if n == 1
            else "neither read as linear by convfuse"
        )

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


def layer_from_merge(merge: Merge, dtype: torch.dtype, device: Any, types: dict[str, str]) -> nn.Module:
    """The module a merge writes in the model's ``dtype`` on ``device``: a conv, or a Linear for
    a region of Linear layers, marked with the layers it replaces (``types``: their class names)."""
    if isinstance(merge.spec, ConvTransposeSpec):  # a merged transposed conv (with a Crop where needed)
        layer = conv_transpose_from_spec(merge.spec, device, dtype)
    else:
        make = linear_from_spec if merge.linear else conv_from_spec
        layer = make(merge.spec, dtype, device)
    if merge.ring is not None:  # case 2: the conv plus its border ring
        layer = border_conv(layer, merge.ring, dtype, device)
    return mark_provenance(layer, merge.sources, merge.kind, types)


def _write_run(
    run: list[tuple[str, nn.Module, list[LinearOp]]],
    ctx: _Context,
    out: list[tuple[str, nn.Module]],
    merges: list[tuple[int, Merge]],
) -> None:
    """Append the layers a run plans to (or the run unchanged) to ``out``."""
    unchanged = [(k, m) for k, m, _ in run]
    ops = [op for _, _, run_ops in run for op in run_ops]
    weights = [found for found in map(weight_dtype_device, ops) if found is not None]
    if not weights:
        out += unchanged
        return
    dtype, device = weights[0]
    args = ctx.shapes.get(ops[0].name)
    shapes = {"t0": ctx.known(args[0][0])} if args else {}
    nodes = [
        op_node(op, f"t{k}", f"t{k + 1}", dtype, device, parameter_sizes(op.origin[1]), op)
        for k, op in enumerate(ops)
    ]
    graph = LinearGraph(nodes, {f"t{len(ops)}"}, {f"t{len(ops)}"}, shapes, pad_layer=True)
    result = plan(graph, ctx.judge, numpy_dtype(dtype))
    for sources, decline in result.declines:
        ctx.report.declined(sources, decline)
    if not result.merges:
        out += unchanged
        return
    first = {id(m.nodes[0]): m for m in result.merges}
    merged = {id(n) for m in result.merges for n in m.nodes}
    for node in nodes:
        op = node.origin
        if id(node) in first:
            m = first[id(node)]
            merges.append((len(out), m))
            types = {o.name: type(o.origin[1]).__name__ for o in ops}
            merged_layer = layer_from_merge(m, dtype, device, types)
            carry_attributes(op.origin[1], merged_layer)
            out.append((op.origin[0], merged_layer))
        elif id(node) not in merged:
            out.append(op.origin)


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
    named = {s for m in report.merges for s in (*m.sources, m.target)}
    named |= {s for d in report.declines for s in d.sources}
    return named


class _GraphFuser:
    """Find maximal linear regions of a traced graph, reduce them, write them back."""

    def __init__(
        self,
        gm: fx.GraphModule,
        prefix: str,
        ctx: _Context,
        inputs: tuple[Any, ...] | None,
        straight_only: str = "",
        aliased: frozenset[str] = frozenset(),
    ) -> None:
        self.gm = gm
        self.aliased = aliased  # layer paths that share their module with another path
        self.straight_only = straight_only  # why only straight runs may merge here ("" : anything may)
        self.declined_children: set[str] = set()  # children holding a merge declined for that
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
        self.calls = Counter(n.target for n in self.nodes if n.op == "call_module")
        self.attr_owners = {  # modules whose tensors the graph reads directly
            ".".join(n.target.split(".")[:k]) for n in self.nodes if n.op == "get_attr"
            for k in range(1, n.target.count(".") + 1)
        }  # fmt: skip
        self.rewrites: list[tuple[bool, str]] = []  # (a straight run of layer calls, scope) per merge
        self.dropped: list[str] = []  # attributes only the merged layers read
        self.target_of: dict[str, str] = {}  # layer name -> call_module target
        args = ctx.shapes.get(prefix) if inputs is None and prefix else None
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if args is not None and len(args) == len(placeholders):
            # A nested module under the latency policy: its recorded input shapes, as zeros.
            inputs = tuple(torch.zeros(shape, dtype=dtype) for shape, dtype in args)
        if inputs is not None:
            try:
                ShapeProp(gm).propagate(*inputs)
            except Exception as exc:  # noqa: BLE001 - shapes are optional
                if not ctx.inferred:  # the user's inputs (an inferred one is only a guess)
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
            if all(a is not UNKNOWN for a in args) and not any(
                isinstance(v, fx.Node) for v in node.kwargs.values()
            ):
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
                    self.target_of[self._name(node.target)] = node.target
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
        if isinstance(entry, (Terms, Cat)):
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
            if isinstance(entry, Unary):
                node = entry.input
            else:
                node = entry.terms[0][0] if isinstance(entry, Terms) else entry.inputs[0]
        return node

    def _move_rank_reads(self, nodes: set[fx.Node], root: fx.Node) -> None:
        """Point rank reads of tensors about to disappear at the region's input (same rank)."""
        for node in nodes:
            if node is root:
                continue
            for user in list(node.users):
                if self._rank_read(user):
                    user.replace_input_with(node, self._anchor(node, nodes))

    # ------------------------------------------------------------------ regions
    def _decline_new_code(self, names: tuple[str, ...], nodes: Iterable[fx.Node]) -> None:
        """Straight runs only here: decline a merge that needs new code, and remember the
        children it lies in (each is fused on its own afterwards)."""
        for node in nodes:
            stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
            if node.op == "call_module" and stack and stack[-1] == node.target:
                stack = stack[:-1]
            if stack:
                self.declined_children.add(stack[0])
        where = self.prefix or type(self.gm).__name__
        self.ctx.report.declined(
            names,
            Decline(
                Reason.UNSUPPORTED,
                f"merging this needs a new forward for {where}, but the forward it would replace writes "
                f"attributes ({self.straight_only}), which a generated forward would not repeat",
            ),
        )

    @property
    def straight(self) -> bool:
        """Every merge replaced a straight run of layer calls: surgery keeps the forward."""
        return all(straight for straight, _ in self.rewrites)

    def inner_scopes(self) -> list[str]:
        """The children (outermost paths) whose own forwards hold a merge that needs new code."""
        scopes = sorted({scope for straight, scope in self.rewrites if not straight} - {""})
        return [s for s in scopes if not any(s.startswith(o + ".") for o in scopes)]

    def _scope(self, nodes: Iterable[fx.Node]) -> str:
        """The innermost module whose forward computes all of ``nodes`` ("" for this one)."""
        common: list[str] | None = None
        for node in nodes:
            stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
            if node.op == "call_module" and stack and stack[-1] == node.target:
                stack = stack[:-1]
            if common is None:
                common = stack
            else:
                k = 0
                while k < min(len(common), len(stack)) and common[k] == stack[k]:
                    k += 1
                common = common[:k]
        return common[-1] if common else ""

    def _is_straight(self, merge: Merge) -> bool:
        """Whether ``merge`` replaces layer calls one after another from its input (each layer
        called once in the graph, its tensors not read directly), so that the merged layer in its
        first layer's place, ``nn.Identity`` in the others, computes it with the module's own
        forward."""
        prev = self.by_name.get(merge.x)
        for node in sorted((n.origin for n in merge.nodes), key=self.order.__getitem__):
            if node.op != "call_module" or self.calls[node.target] != 1 or node.target in self.attr_owners:
                return False
            if node.target in self.aliased or node.args != (prev,) or node.kwargs:
                return False
            prev = node
        return True

    def run(self) -> bool:
        self._build()
        graph = self._linear_graph()
        if any(n.kind.is_anchor for n in graph.nodes):
            result = plan(graph, self.ctx.judge, numpy_dtype(self._dtype))
            for sources, decline in result.declines:
                self.ctx.report.declined(sources, decline)
            self._write(result)
        self._explain_unmerged()
        if self.changed:
            self._restore_inplace()
            self._clean()
        return self.changed

    def _written_as(self) -> tuple[torch.dtype, Any]:
        """The dtype and device of the graph's first conv or Linear (what merges are written in)."""
        for entry in self.entries.values():
            found = weight_dtype_device(entry.op) if isinstance(entry, Unary) else None
            if found is not None:
                return found
        return torch.get_default_dtype(), torch.device("cpu")

    @property
    def _dtype(self) -> torch.dtype:
        return self._written_as()[0]

    def _linear_graph(self) -> LinearGraph:
        """The graph's linear nodes as the planner's IR (the torch.fx importer)."""
        default = self._dtype
        device = self._written_as()[1]
        nodes: list[LinearNode] = []
        for node in self.nodes:
            entry = self.entries.get(node)
            if isinstance(entry, Unary):
                meta = entry.input.meta.get("tensor_meta")
                dtype = meta.dtype if isinstance(meta, TensorMetadata) else default
                nodes.append(
                    op_node(entry.op, entry.input.name, node.name, dtype, device, self._weights(node), node)
                )
            elif isinstance(entry, Terms):
                coefs = []
                for _, tail in entry.terms:
                    c = 1.0
                    for op in tail:
                        c *= float(op.scale)
                    coefs.append(c)
                inputs = tuple(t.name for t, _ in entry.terms)
                nodes.append(
                    LinearNode(node.name, OpKind.SUM, inputs, node.name, coefs=tuple(coefs), origin=node)
                )
            elif isinstance(entry, Cat):
                inputs = tuple(t.name for t in entry.inputs)
                nodes.append(LinearNode(node.name, OpKind.CONCAT, inputs, node.name, origin=node))
        external: set[str] = set()
        outputs: set[str] = set()
        for node in self.nodes:
            for user in self._users(node):
                if user.op == "output":
                    outputs.add(node.name)
                if user not in self.entries:
                    external.add(node.name)
        shapes = {}
        for node in self.nodes:
            meta = node.meta.get("tensor_meta")
            if isinstance(meta, TensorMetadata):
                shapes[node.name] = self.ctx.known(tuple(int(d) for d in meta.shape))
        by_name = {n.name: n for n in self.nodes}

        def describe(name: str) -> str:
            outside = [u for u in self._users(by_name[name]) if u not in self.entries]
            return ", ".join(self._describe(u) for u in outside)

        return LinearGraph(nodes, external | outputs, outputs, shapes, describe=describe, pad_layer=True)

    def _weights(self, node: fx.Node) -> dict[Hashable, int]:
        """The parameters a node reads (a module's, or those it reads through get_attr)."""
        if node.op == "call_module":
            return parameter_sizes(self.gm.get_submodule(node.target))
        values = [self._const(a) for a in node.all_input_nodes if a.op == "get_attr"]
        return parameter_sizes(*values)

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
            return (
                text + ", an in-place write (a sum only when nothing but rank reads used its target before)"
            )
        return text if _shape_read(node) else text + ", which convfuse does not read as a linear op"

    # ------------------------------------------------------------------ write back
    def _write(self, result: Plan) -> None:
        """The plan as fx nodes (the torch.fx exporter): a merge is one conv module called on its
        input, a sum left with fewer terms a chain of adds; replaced nodes are erased."""
        by_name = self.by_name = {n.name: n for n in self.nodes}
        value: dict[str, fx.Node] = dict(by_name)
        for merges, resum in result.groups():
            fx_nodes = {n.origin for m in merges for n in m.nodes} | (
                {n.origin for n in resum.nodes} if resum else set()
            )
            root = max(fx_nodes, key=self.order.__getitem__)
            names = tuple(self._node_name(n) for n in sorted(fx_nodes, key=self.order.__getitem__))
            hazard = self._inplace_hazard(root, fx_nodes) or self._regrouped(merges, fx_nodes)
            if hazard is not None:
                self.ctx.report.declined(names, hazard)
                continue
            straight = resum is None and self._is_straight(merges[0])
            if self.straight_only and not straight:
                self._decline_new_code(names, fx_nodes)
                continue
            self.rewrites.append((straight, "" if straight else self._scope(fx_nodes)))
            replaced: list[tuple[fx.Node, fx.Node]] = []
            for merge in merges:
                last = max((n.origin for n in merge.nodes), key=self.order.__getitem__)
                target = (
                    self.target_of[merge.sources[0]] if straight else self._new_module_name(merge.sources)
                )
                types = layer_types(self.gm, merge.sources, self.prefix)
                self.gm.add_submodule(
                    target, layer_from_merge(merge, self._dtype_of(merge), self._written_as()[1], types)
                )
                with self.graph.inserting_before(last):
                    new = self.graph.call_module(target, (value[merge.x],))
                    if self._leading(merge) is not None:  # [N, C] from [B, ..., C]: as the reshapes did
                        new = self.graph.call_method("flatten", (new, 0, -2))
                value[merge.y] = new
                if merge.y in by_name:
                    replaced.append((by_name[merge.y], new))
                self.ctx.report.merged(
                    merge.kind,
                    merge.sources,
                    self._name(target),
                    merge.before,
                    merge.after,
                    merge.note,
                    merge.timing,
                )
            if resum is not None:
                sum_root = max((n.origin for n in resum.nodes), key=self.order.__getitem__)
                with self.graph.inserting_before(sum_root):
                    replaced.append((sum_root, self._sum(resum, value)))
            for old, new in replaced:
                old.replace_all_uses_with(new)
            for old, new in replaced:  # a term may read a replaced node: point it at the new one
                for user in list(old.users):
                    user.replace_input_with(old, new)
            for old, _ in replaced:
                self._replace(old, fx_nodes)
            self.changed = True

    def _leading(self, merge: Merge) -> tuple[int, int] | None:
        """Ranks of a merged Linear's input and output when the reshapes it replaces end with
        other leading dims than its input's (``bn(linear(x).flatten(0, 1))`` read as it is), else
        None: the Linear keeps its input's leading dims, so the writer flattens them back."""
        if not merge.linear or not any(n.layout == REGROUP for n in merge.nodes):
            return None
        metas = [
            self.by_name[t].meta.get("tensor_meta") if t in self.by_name else None for t in (merge.x, merge.y)
        ]
        if not all(isinstance(m, TensorMetadata) for m in metas):
            return (0, 0)
        before, after = (tuple(m.shape) for m in metas)
        return None if before[:-1] == after[:-1] else (len(before), len(after))

    def _regrouped(self, merges: list[Merge], fx_nodes: set[fx.Node]) -> Decline | None:
        """Why a merge's output cannot be given back its leading dims (only a ``[N, C]`` output
        can: ``flatten(0, -2)`` of the Linear's, at every size), or why a tensor it replaces
        must stay: ``u.reshape_as(t)`` reads ``t``'s shape (not its values, so ``t`` is not
        external to the planner) and is not replaced with it."""
        for merge in merges:
            for node in {n.origin for n in merge.nodes} - {self.by_name.get(merge.y)}:
                kept = [u for u in node.users if u not in fx_nodes and not self._rank_read(u)]
                if kept:
                    return Decline(
                        Reason.SHARED_TENSOR,
                        f"{self._describe(kept[0])} reads the shape of {self._node_name(node)}, "
                        "which this merge replaces",
                    )
            ranks = self._leading(merge)
            if ranks is not None and (ranks[1] != 2 or ranks[0] < 2):
                return Decline(
                    Reason.RANK_MISMATCH,
                    f"the merged Linear layer would keep the leading dims of {merge.x}, which the reshapes "
                    f"it replaces regroup to another shape than [N, C]",
                )
        return None

    def _dtype_of(self, merge: Merge) -> torch.dtype:
        for node in merge.nodes:
            op = self.entries[node.origin].op if isinstance(self.entries.get(node.origin), Unary) else None
            found = weight_dtype_device(op) if op is not None else None
            if found is not None:
                return found[0]
        meta = self.nodes[self.order[merge.nodes[0].origin]].meta.get("tensor_meta")
        return meta.dtype if isinstance(meta, TensorMetadata) else self._dtype

    def _sum(self, resum: Resum, value: dict[str, fx.Node]) -> fx.Node:
        """``sum_i c_i t_i`` as fx nodes: a positive term first, then adds and subs."""
        terms = sorted(resum.terms, key=lambda tc: tc[1] < 0)
        acc = value[terms[0][0]]
        if terms[0][1] != 1:
            acc = self.graph.call_function(operator.mul, (acc, terms[0][1]))
        for name, coef in terms[1:]:
            term = value[name]
            if coef == 1:
                acc = self.graph.call_function(operator.add, (acc, term))
            elif coef == -1:
                acc = self.graph.call_function(operator.sub, (acc, term))
            else:
                acc = self.graph.call_function(
                    operator.add, (acc, self.graph.call_function(operator.mul, (term, coef)))
                )
        return acc

    def _replace(self, root: fx.Node, nodes: set[fx.Node]) -> None:
        """Erase the replaced nodes once nothing reads them (rank reads move to the input)."""
        self._move_rank_reads(nodes, root)
        for node in sorted(nodes, key=self.order.__getitem__, reverse=True):
            if not getattr(node, "_erased", False) and not node.users:
                self.graph.erase_node(node)

    def _new_module_name(self, sources: Iterable[str]) -> str:
        """``<common parent of the merged layers>_fused`` on this graph's root (never inside a
        child whose own forward may still run), made unique."""
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
        base = "_".join(common + ["fused"])
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
                self.dropped.append(target)
        for node in self.graph.nodes:
            if isinstance(node.type, str):
                # A PEP 563 string annotation ends up as a string global in the generated code,
                # which torch.save cannot pickle; the annotation carries no behaviour.
                node.type = None
        self.graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
