"""What a fuse pass did: merges, declines with reasons, and cost before and after.

Both front ends fill the same :class:`Report`; the CLI and the Python API print it as text or
JSON. No graph types here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .algebra import Cost
from .decline import Decline, Reason

__all__ = ["MergeKind", "Merge", "Declined", "ModelStats", "Report"]


class MergeKind(str, Enum):
    """What kind of merge a :class:`Merge` was, in the words of the summary line.

    The front ends record a detailed ``kind`` (ONNX: the op kinds of a chain joined by ``+``,
    e.g. ``"bn+conv+bn"``, or ``"sum"``/``"identity"``; torch: ``"chain"``, ``"conv+affine"``,
    ``"sum"``, ``"sum+chain"``, ``"identity"``); :meth:`of` maps each to one of these.
    """

    CONV_BN = "conv+bn"  # one conv and BatchNorms before or after it
    CONV_AFFINE = "conv+affine"  # one conv and per-channel scales/shifts (Mul, Add, Sub, Div)
    PAD = "pad into conv"  # a zero Pad folded into one conv's padding
    CHAIN = "conv chain"  # consecutive convs (or average pools) composed into one
    SUM = "sum of branches"  # parallel branches of one input, summed, as one conv
    CONCAT = "concat of branches"  # parallel branches of one input, concatenated, as one conv
    IDENTITY = "identity removed"  # a node that computes nothing, dropped
    FOLD = "constant folded"  # nodes computed from constants only, stored as initializers
    BORDER = "border fill as pad"  # a border written with a layer's zero response, as a zero pad
    OTHER = "other"  # a kind this table does not know yet

    __str__ = str.__str__  # the value, in reports and f-strings
    __format__ = str.__format__  # type: ignore[assignment]

    @classmethod
    def of(cls, kind: str) -> MergeKind:
        """The summary kind of a front end's detailed ``kind``."""
        if kind == "identity":
            return cls.IDENTITY
        if kind == "fold":
            return cls.FOLD
        if kind == "border":
            return cls.BORDER
        if kind == "sum" or kind.startswith("sum+"):
            return cls.SUM
        if kind == "concat" or kind.startswith("concat+"):
            return cls.CONCAT
        if kind == "chain":
            return cls.CHAIN
        if kind == "conv+affine":
            return cls.CONV_AFFINE
        parts = ["conv" if p in ("linear", "convtranspose") else p for p in kind.split("+")]
        others = {p for p in parts if p != "conv"}
        if "conv" not in parts or not others <= _CHAIN_PARTS:
            return cls.OTHER
        if parts.count("conv") > 1 or "avgpool" in others:
            return cls.CHAIN
        if others == {"bn"}:
            return cls.CONV_BN
        if others == {"pad"}:
            return cls.PAD
        return cls.CONV_AFFINE


#: Op kinds an ONNX chain is made of (``LinearOp.kind``).
_CHAIN_PARTS = {"bn", "mul", "add", "sub", "div", "neg", "affine", "pad", "avgpool"}


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

    @property
    def group(self) -> MergeKind:
        """The summary kind (:class:`MergeKind`) of the detailed ``kind``."""
        return MergeKind.of(self.kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "group": self.group.value,
            "sources": list(self.sources),
            "target": self.target,
            "macs_before": self.before.macs,
            "macs_after": self.after.macs,
            "params_before": self.before.params,
            "params_after": self.after.params,
            "note": self.note,
            "latency_ms": (
                None
                if self.latency is None
                else {"before": self.latency[0] * 1e3, "after": self.latency[1] * 1e3}
            ),
        }

    def line(self, name: Callable[[str], str] = str) -> str:
        """Today's one line per merge; ``name`` shortens the layer names (e.g. relative to a block)."""
        notes = [f"latency {_ms(self.latency[0])} -> {_ms(self.latency[1])}"] if self.latency else []
        notes += [self.note] if self.note else []
        note = f" [{'; '.join(notes)}]" if notes else ""
        return (
            f"merged {self.kind}: {' + '.join(map(name, self.sources))} -> {name(self.target)} "
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

    def line(self, name: Callable[[str], str] = str) -> str:
        layers = " + ".join(map(name, self.sources))
        return f"kept {layers}: {self.decline.reason.value}: {self.decline.message}"


@dataclass
class ModelStats:
    """Operator counts, parameters, and multiply-accumulates (None when shapes are unknown)."""

    op_counts: dict[str, int] = field(default_factory=dict)
    params: int = 0
    macs: int | None = None
    size: int | None = None  # bytes of the serialised model, weights included (None: not measured)

    def to_dict(self) -> dict[str, Any]:
        return {
            "op_counts": dict(sorted(self.op_counts.items())),
            "params": self.params,
            "macs": self.macs,
            "size": self.size,
        }


@dataclass
class Report:
    """The result of one fuse pass.

    ``verification`` is the verifier's one-line verdict when the pass was checked (the CLI sets
    it); ``timings`` the seconds each stage took (``"fuse"``, ``"verify"``); ``positions`` the
    index of each original node or layer name in graph order, for :meth:`verbose` to sort by.
    """

    merges: list[Merge] = field(default_factory=list)
    declines: list[Declined] = field(default_factory=list)
    before: ModelStats = field(default_factory=ModelStats)
    after: ModelStats = field(default_factory=ModelStats)
    notes: list[str] = field(default_factory=list)
    verification: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict, repr=False)

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

    def merge_counts(self) -> dict[MergeKind, int]:
        """How many merges of each kind, in :class:`MergeKind` order (kinds with none left out)."""
        counts = {kind: 0 for kind in MergeKind}
        for m in self.merges:
            counts[m.group] += 1
        return {kind: n for kind, n in counts.items() if n}

    def decline_groups(self) -> dict[Reason, list[Declined]]:
        """The declines by reason, most frequent first (ties in :class:`Reason` order)."""
        groups: dict[Reason, list[Declined]] = {}
        for d in self.declines:
            groups.setdefault(d.reason, []).append(d)
        order = list(Reason)
        return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), order.index(kv[0]))))

    def to_dict(self) -> dict[str, Any]:
        """Every detail, JSON-ready. ``notes`` ends with the verification line (as it always has)."""
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "merges": [m.to_dict() for m in self.merges],
            "merge_counts": {kind.value: n for kind, n in self.merge_counts().items()},
            "declines": [d.to_dict() for d in self.declines],
            "notes": [*self.notes, *([self.verification] if self.verification else [])],
            "verification": self.verification,
            "timings": dict(self.timings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def summary(self, *, width: int = 80, colour: bool = False) -> str:
        """What people read at a glance: the before/after table, one line per merge kind and per
        decline reason, the notes and the verification line (:mod:`convfuse.report_text`)."""
        from .report_text import summary

        return summary(self, width=width, colour=colour)

    def verbose(self, *, width: int = 80, colour: bool = False) -> str:
        """The table, then every merge and decline on its own line, grouped by block in graph order."""
        from .report_text import verbose

        return verbose(self, width=width, colour=colour)

    def to_text(self, verbose: bool = False) -> str:
        return self.verbose() if verbose else self.summary()

    def __str__(self) -> str:
        return self.to_text()
