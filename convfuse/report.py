"""What a fuse pass did: merges, declines with reasons, and cost before and after.

Both front ends fill the same :class:`Report`; the CLI and the Python API print it as text or
JSON. No graph types here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .algebra import Cost
from .decline import Decline, Reason

__all__ = ["Merge", "Declined", "ModelStats", "Report"]


@dataclass(frozen=True)
class Merge:
    """Layers ``sources`` became the single convolution ``target``."""

    kind: str  # "chain", "conv+affine", "sum", "concat", ...
    sources: tuple[str, ...]
    target: str
    before: Cost
    after: Cost
    note: str = ""  # e.g. which padding case applied
    latency: tuple[float, float] | None = None  # measured seconds per run (unmerged, merged)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sources": list(self.sources),
            "target": self.target,
            "macs_before": self.before.macs,
            "macs_after": self.after.macs,
            "params_before": self.before.params,
            "params_after": self.after.params,
            "note": self.note,
            "latency_ms": None
            if self.latency is None
            else {"before": self.latency[0] * 1e3, "after": self.latency[1] * 1e3},
        }

    def line(self) -> str:
        notes = [f"latency {_ms(self.latency[0])} -> {_ms(self.latency[1])}"] if self.latency else []
        notes += [self.note] if self.note else []
        note = f" [{'; '.join(notes)}]" if notes else ""
        return (
            f"merged {self.kind}: {' + '.join(self.sources)} -> {self.target} "
            f"(MACs/pos {self.before.macs:,} -> {self.after.macs:,}, "
            f"params {self.before.params:,} -> {self.after.params:,}){note}"
        )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


@dataclass(frozen=True)
class Declined:
    """Layers ``sources`` were left as they are, for ``decline.reason``."""

    sources: tuple[str, ...]
    decline: Decline

    @property
    def reason(self) -> Reason:
        return self.decline.reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "reason": self.decline.reason.value,
            "message": self.decline.message,
        }

    def line(self) -> str:
        return f"kept {' + '.join(self.sources)}: {self.decline.reason.value}: {self.decline.message}"


@dataclass
class ModelStats:
    """Operator counts, parameters, and multiply-accumulates (None when shapes are unknown)."""

    op_counts: dict[str, int] = field(default_factory=dict)
    params: int = 0
    macs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"op_counts": dict(sorted(self.op_counts.items())), "params": self.params, "macs": self.macs}


@dataclass
class Report:
    """The result of one fuse pass."""

    merges: list[Merge] = field(default_factory=list)
    declines: list[Declined] = field(default_factory=list)
    before: ModelStats = field(default_factory=ModelStats)
    after: ModelStats = field(default_factory=ModelStats)
    notes: list[str] = field(default_factory=list)

    def merged(
        self,
        kind: str,
        sources: list[str] | tuple[str, ...],
        target: str,
        before: Cost,
        after: Cost,
        note: str = "",
        latency: tuple[float, float] | None = None,
    ) -> None:
        self.merges.append(Merge(kind, tuple(sources), target, before, after, note, latency))

    def declined(self, sources: list[str] | tuple[str, ...], decline: Decline) -> None:
        self.declines.append(Declined(tuple(sources), decline))

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "merges": [m.to_dict() for m in self.merges],
            "declines": [d.to_dict() for d in self.declines],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def summary_table(self) -> str:
        """Before/after counts of the ops that matter, parameters and MACs."""
        ops = sorted(set(self.before.op_counts) | set(self.after.op_counts))
        rows = [("", "before", "after")]
        rows += [(op, str(self.before.op_counts.get(op, 0)), str(self.after.op_counts.get(op, 0))) for op in ops]
        rows.append(("parameters", f"{self.before.params:,}", f"{self.after.params:,}"))
        if self.before.macs is not None and self.after.macs is not None:
            rows.append(("MACs", f"{self.before.macs:,}", f"{self.after.macs:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)

    def to_text(self) -> str:
        lines = [self.summary_table(), ""]
        lines += [m.line() for m in self.merges]
        lines += [d.line() for d in self.declines]
        lines += [f"note: {n}" for n in self.notes]
        if not self.merges and not self.declines:
            lines.append("no linear runs found to merge")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()
