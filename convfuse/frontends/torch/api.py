"""PyTorch front end: ``fuse(module)`` merges every exact linear run of an ``nn.Module``.

The returned module is the caller's model (a copy), not a rewrite of it: every module keeps its
class, attributes, methods, buffers, hooks and ``training`` flag. An ``nn.Sequential`` its parent
calls as a whole has its runs merged in place (a Sequential whose children the parent calls one
by one, as routing loops do, is fused child by child). Any other module is traced with
``torch.fx`` (:func:`.surgery.trace_restoring`: tracing never changes it) and written back
by surgery when every merge is a straight run of layer calls, or given a generated forward on a
subclass of its own class, as deep in the tree as the merge allows (:mod:`.surgery` says
which happens when). A module fx cannot trace (data-dependent control flow) keeps its own
forward and has its children fused one by one; the report says which modules were not traced.
Before returning, :mod:`.check` runs the result next to the original and puts back any
module that raises or differs (reason ``self-check``).

The walk over the tree is :mod:`.walk`; one traced graph is fused by :mod:`.regions`.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ...decline import Decline, Reason
from ...errors import (
    ConvfuseError,
    InternalError,
    InvalidModelError,
    InvalidOptionError,
    TrainingModeError,
    internal_message,
    one_line,
)
from ...latency import judge_for
from ...policy import Policy
from ...report import ModelStats, Report
from ...timing import DEFAULT_BUDGET, Timer
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
from .context import _Args, _Context
from .explain import _explain_remaining_convs
from .walk import _fuse_any

__all__ = ["fuse", "fuse_with_report"]


_BATCHNORM = nn.modules.batchnorm._BatchNorm


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
    example = inputs or probe
    # example inputs: latency, border rings
    if example is not None and (inputs is not None or (ranks and probe is not None)):
        shapes = _input_shapes(reference, example)
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
        for candidate in candidates:  # the smallest size the model runs at
            try:
                run_quietly(reference, candidate)
                break
            except Exception:  # noqa: BLE001 - the next size, or the note below
                continue
        inputs = candidate
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
