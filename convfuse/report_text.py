"""A :class:`~convfuse.report.Report` as terminal text: the short summary and the verbose listing.

    summary   the before/after table (op types whose count changed, parameters, MACs, size,
              time), one line per merge kind with its count, one line per decline reason with
              its count and the first places, the notes and the verification line;
    verbose   the same table, then every merge and decline on its own line, grouped by the
              block (common name scope) it belongs to, blocks and lines in graph order.

Lines fit ``width`` columns (80 by default); ``colour`` adds ANSI colours (the caller decides:
on a terminal, unless ``NO_COLOR`` is set). No graph types and no I/O here.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .report import Declined, Merge, Report

__all__ = ["summary", "verbose", "table", "blocks", "Block", "PLACES"]

#: Places named on a decline reason's summary line before "and N more".
PLACES = 3

_BOLD, _GREEN, _RED, _YELLOW = "1", "32", "31", "33"


def _paint(text: str, code: str, colour: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code and text else text


def _wrap(text: str, width: int, indent: str = "", more: str = "    ") -> list[str]:
    """``text`` in lines of at most ``width`` columns (long names broken where they must be)."""
    return textwrap.wrap(
        text,
        width=max(width, 20),
        initial_indent=indent,
        subsequent_indent=indent + more,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [indent]


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 100 else f"{s:,.0f} s"


def table(report: Report) -> list[str]:
    """Before/after rows: every op type whose count changed (and Conv, ConvTranspose), parameters, MACs, size,
    then the time each stage took."""
    before, after = report.before, report.after
    ops = sorted(
        op
        for op in set(before.op_counts) | set(after.op_counts)
        if op == "Conv"
        or op.startswith(
            "ConvTranspose"
        )  # listed whenever present (ONNX ConvTranspose, torch ConvTranspose2d)
        or before.op_counts.get(op, 0) != after.op_counts.get(op, 0)
    )
    rows = [("", "before", "after")]
    rows += [(op, f"{before.op_counts.get(op, 0):,}", f"{after.op_counts.get(op, 0):,}") for op in ops]
    rows.append(("parameters", f"{before.params:,}", f"{after.params:,}"))
    if before.macs is not None and after.macs is not None:
        rows.append(("MACs", f"{before.macs:,}", f"{after.macs:,}"))
    if before.size is not None or after.size is not None:
        rows.append(("size", _size(before.size), _size(after.size)))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}".rstrip() for a, b, c in rows]
    if report.timings:
        total = sum(report.timings.values())
        parts = ", ".join(f"{stage} {_seconds(s)}" for stage, s in report.timings.items())
        stages = f" ({parts})" if len(report.timings) > 1 else ""
        lines.append(f"{'time':<{w[0]}}  {_seconds(total)}{stages}")
    return lines


def _short(name: str, limit: int) -> str:
    """``name`` cut from the left to ``limit`` characters (the end of a scoped name says most)."""
    return name if len(name) <= limit else "..." + name[len(name) - limit + 3 :]


def _merged_line(report: Report) -> str:
    counts = report.merge_counts()
    kinds = ", ".join(f"{kind.value} {n}" for kind, n in counts.items())
    return f"merged  {kinds or 'nothing'}"


def _tail(report: Report, width: int, colour: bool) -> list[str]:
    """The notes and the verification line."""
    lines = [line for note in report.notes for line in _wrap(f"note: {note}", width)]
    if report.verification:
        v = report.verification
        unchecked = "not verified" in v or "skipped" in v
        code = _GREEN if v.startswith("verified: candidate matches") else _YELLOW if unchecked else _RED
        lines += [_paint(line, code, colour) for line in _wrap(report.verification, width)]
    return lines


def summary(report: Report, *, width: int = 80, colour: bool = False) -> str:
    """The report at a glance (see the module docstring)."""
    lines = table(report) + [""]
    if not report.merges and not report.declines:
        lines.append("no linear runs found to merge")
    else:
        lines += _wrap(_merged_line(report), width, more="        ")
        for reason, group in report.decline_groups().items():
            places = list(dict.fromkeys(d.sources[0] for d in group if d.sources))
            shown = ", ".join(_short(p, 40) for p in places[:PLACES])
            more = f" and {len(places) - PLACES} more" if len(places) > PLACES else ""
            text = f"kept    {reason.value} {len(group)}: {shown}{more}"
            lines += [_paint(line, _YELLOW, colour) for line in _wrap(text, width, more="        ")]
    return "\n".join(lines + _tail(report, width, colour))


# --------------------------------------------------------------------------- verbose
Item = Union["Merge", "Declined"]


@dataclass
class Block:
    """Merges and declines under one name scope (``""``: the top level), in graph order."""

    scope: str
    separator: str
    items: list[Item] = field(default_factory=list)

    def short(self, name: str) -> str:
        """``name`` relative to this block."""
        prefix = self.scope + self.separator
        return name[len(prefix) :] if self.scope and name.startswith(prefix) else name


def _split(name: str) -> tuple[str, list[str]]:
    sep = "/" if "/" in name else "."
    return sep, name.split(sep)


def _scope(names: Sequence[str]) -> tuple[str, str]:
    """The longest scope (all but each name's last part) the names share, and its separator."""
    if not names:
        return "", "/"
    sep = _split(names[0])[0]
    parts = [_split(n)[1][:-1] if _split(n)[0] == sep else [] for n in names]
    common: list[str] = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return sep.join(common), sep


def _natural(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def blocks(report: Report) -> list[Block]:
    """The merges and declines grouped by block, in graph order.

    A merge whose result a later merge consumed (conv+bn, then the sum of branches it is in)
    belongs with that later merge; a group's block is the scope all its layers share. A decline
    joins the block of its own scope.
    """
    merges, declines = report.merges, report.declines
    absorbed_by: dict[int, int] = {}
    latest: dict[str, int] = {}
    for i, m in enumerate(merges):
        for s in m.sources:
            j = latest.get(s)
            if j is not None and j != i:
                absorbed_by[j] = i
        latest[m.target] = i

    def root(i: int) -> int:
        while i in absorbed_by:
            i = absorbed_by[i]
        return i

    members: dict[int, list[int]] = {}
    for i in range(len(merges)):
        members.setdefault(root(i), []).append(i)

    def position(items: Sequence[Item]) -> tuple[float, list[int | str]]:
        first = min((report.positions.get(s, math.inf) for it in items for s in it.sources), default=math.inf)
        return first, _natural(items[0].sources[0] if items and items[0].sources else "")

    # Units in a block: a merge with the merges it consumed (in the order they were made), or
    # one decline; units sort by the first layer they touch.
    found: dict[str, tuple[Block, list[list[Item]]]] = {}
    for group in members.values():
        scope, sep = _scope([s for i in group for s in merges[i].sources])
        found.setdefault(scope, (Block(scope, sep), []))[1].append([merges[i] for i in group])
    for d in declines:
        scope, sep = _scope(list(d.sources))
        found.setdefault(scope, (Block(scope, sep), []))[1].append([d])
    ordered = []
    for block, units in found.values():
        units.sort(key=position)
        block.items = [item for unit in units for item in unit]
        ordered.append((position([item for unit in units for item in unit]), block))
    return [block for _, block in sorted(ordered, key=lambda pb: pb[0])]


def verbose(report: Report, *, width: int = 80, colour: bool = False) -> str:
    """The table, then every merge and decline grouped by block (see the module docstring)."""
    lines = table(report) + [""]
    if not report.merges and not report.declines:
        lines.append("no linear runs found to merge")
    for block in blocks(report):
        lines.append(_paint(block.scope or "(top level)", _BOLD, colour))
        for item in block.items:
            text = item.line(block.short)
            code = _YELLOW if text.startswith("kept") else ""
            lines += [_paint(line, code, colour) for line in _wrap(text, width, indent="  ")]
    if report.merges or report.declines:
        lines.append("")
        lines += _wrap(_merged_line(report), width, more="        ")
    return "\n".join(lines + _tail(report, width, colour))
