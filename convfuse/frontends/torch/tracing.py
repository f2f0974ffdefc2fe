"""Tracing a module for the walk: the ``torch.fx`` tracer (layers the rule tables know stay
whole), capture where symbolic tracing stops, the state fold before import, and torch.fx
failures reported as :class:`~convfuse.errors.TorchFxError` naming the module.
"""

from __future__ import annotations

import os
from typing import Any

from torch import fx, nn

from ...decline import Decline, Reason
from ...errors import ConvfuseError, TorchFxError, one_line
from .capture import CaptureMixin
from .context import _Context, _join
from .fill import read_borders
from .fold import FoldResult, StateValues, drop_dead_state, fold_state
from .ring import BorderConv
from .rules import has_module_rule
from .surgery import has_hooks, trace_restoring


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
                f"torch.fx cannot trace {type(module).__name__}{inside} ({one_line(exc, 200)}); its forward "
                "is kept and its children were fused separately",
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
