"""Pre-passes run on an ONNX model before the front end plans: rewrites that expose linear layers.

:data:`PREPASSES` in order: fold input-independent subgraphs and static shape arithmetic to
initializers (:mod:`.onnx_fold`), then read bias-filled borders as zero pads moved before the
layer that maps zero to the border (:mod:`.onnx_border`, which needs the folded index tensors).
Each records what it did and declined in the shared :class:`~convfuse.report.Report`.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from ...algebra import Cost
from ...report import Report
from .border import read_borders
from .fold import fold_constants

__all__ = ["PREPASSES", "prepare"]

_ZERO = Cost(0, 0)

Prepass = Callable[[onnx.ModelProto, Report], bool]


def fold_pass(model: onnx.ModelProto, report: Report) -> bool:
    """Constant folding; one ``fold`` entry per folded subgraph, a note with the totals."""
    result = fold_constants(model)
    for f in result.folded:
        note = f"{len(f.nodes)} node(s) folded to {len(f.tensors)} initializer(s), {f.elements:,} element(s)"
        report.merged("fold", list(f.nodes), ", ".join(f.tensors) or "(dead)", _ZERO, _ZERO, note)
    for sources, decline in result.declines:
        report.declined(sources, decline)
    if result.folded or result.removed_dead:
        report.notes.append(
            f"constant folding: {result.node_count} node(s) computed from constants and static shapes "
            f"folded ({len(result.folded)} subgraph(s), {result.removed_dead} dead node(s) removed)"
        )
    return bool(result.folded or result.removed_dead)


def border_pass(model: onnx.ModelProto, report: Report) -> bool:
    """Bias-filled borders as zero pads; one ``border`` entry per rewrite."""
    result = read_borders(model)
    for m in result.moved:
        note = f"border written with {m.layer}'s zero response: a zero pad moved before it"
        report.merged("border", [m.layer, m.pad, *m.writes], m.pad, _ZERO, _ZERO, note)
    for sources, decline in result.declines:
        report.declined(sources, decline)
    return bool(result.moved)


#: The pre-passes, in order.
PREPASSES: tuple[Prepass, ...] = (fold_pass, border_pass)


def prepare(model: onnx.ModelProto, report: Report) -> bool:
    """Run :data:`PREPASSES` on ``model`` in place; whether any changed it."""
    changed = False
    for prepass in PREPASSES:
        changed = prepass(model, report) or changed
    return changed
