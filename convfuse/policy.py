"""When a merge pays (DESIGN.md section 3). Shared by both front ends.

``flops`` (default) merges only what does not increase MACs or parameters; ``always`` every
exact merge; ``latency`` times each candidate with the :class:`~convfuse.timing.Timer` it is
given (the front ends pass ONNX Runtime's, :class:`convfuse.latency.OrtTimer`) and keeps the
merges that measure faster. :func:`judge` and :func:`judge_latency` are the rules; a
:class:`Judge` applies one policy to candidates and carries the timings. Core: this module
imports no runtime and no front end.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .algebra import Cost
from .decline import Decline, Reason
from .errors import InvalidOptionError
from .timing import Candidate, LatencyMeter, Timer, Timing, ms

__all__ = ["MAX_LATENCY_MAC_RATIO", "Policy", "Decision", "Judge", "judge", "judge_latency"]

#: Under ``latency``, a candidate whose merged conv would cost more than this many times the
#: MACs of its layers is declined without being timed (it cannot win, and timing it is slow).
MAX_LATENCY_MAC_RATIO = 32


class Policy(str, Enum):
    """``flops``: never increase MACs or parameters. ``always``: every exact merge.
    ``latency``: keep the merges ONNX Runtime measures faster."""

    FLOPS = "flops"
    ALWAYS = "always"
    LATENCY = "latency"

    @classmethod
    def parse(cls, value: str | Policy) -> Policy:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise InvalidOptionError(f"unknown policy {value!r}; choose one of {names}") from None


def judge(policy: Policy | str, before: Cost, after: Cost) -> Decline | None:
    """``None`` when the merge should be made under ``policy``, else the reason it is not.

    ``latency`` needs timings (:class:`Judge`); here it is judged like ``flops``."""
    if Policy.parse(policy) is Policy.ALWAYS or after <= before:
        return None
    return Decline(
        Reason.NOT_PROFITABLE,
        f"merged conv would cost {after.macs:,} MACs/position and {after.params:,} parameters "
        f"against {before.macs:,} and {before.params:,} unmerged (use policy 'always' to merge anyway)",
    )


def judge_latency(timing: Timing, margin: float, where: str = "") -> Decline | None:
    """``None`` when ``timing.merged <= timing.original * (1 + margin)``, else why not."""
    if timing.merged <= timing.original * (1 + margin):
        return None
    on = f" on {where}" if where else ""
    return Decline(
        Reason.NOT_PROFITABLE,
        f"merged conv measured {ms(timing.merged)} against {ms(timing.original)} unmerged{on} "
        f"(latency policy keeps merges at most {margin:.0%} slower)",
    )


@dataclass(frozen=True)
class Decision:
    """A judge's answer: the decline (``None``: merge), the timing it rests on, a note."""

    decline: Decline | None
    timing: Timing | None = None
    note: str = ""  # e.g. that the flops rule decided because the latency budget was spent


class Judge:
    """One policy applied to candidate merges; under ``latency`` it times them with ``meter``.

    Front ends call :meth:`decide` with the costs and, under ``latency``, the
    :class:`~convfuse.timing.Candidate` (the layers and the merged conv). A candidate that
    cannot be timed (budget spent, no kernel for its type) is judged by the flops rule and the
    decision says so. ``latency`` needs a ``meter``, or a ``timer`` to build one with the
    default budget and margin: the judge owns no runtime (:func:`convfuse.latency.judge_for`
    builds the ONNX Runtime one).
    """

    def __init__(
        self,
        policy: Policy | str = Policy.FLOPS,
        meter: LatencyMeter | None = None,
        *,
        timer: Timer | None = None,
    ) -> None:
        self.policy = Policy.parse(policy)
        if self.policy is Policy.LATENCY and meter is None:
            if timer is None:
                raise InvalidOptionError(
                    "the latency policy needs a timer "
                    "(convfuse.latency.judge_for builds the ONNX Runtime one)"
                )
            meter = LatencyMeter(timer=timer)
        self.meter = meter if self.policy is Policy.LATENCY else None

    @classmethod
    def of(cls, policy: Policy | str | Judge) -> Judge:
        """``policy`` itself if it is a judge, else a judge for it."""
        return policy if isinstance(policy, Judge) else cls(policy)

    @property
    def times(self) -> bool:
        """Whether decisions need a :class:`~convfuse.timing.Candidate` (the latency policy)."""
        return self.meter is not None

    def decide(self, before: Cost, after: Cost, candidate: Candidate | None = None) -> Decision:
        """Whether to merge layers costing ``before`` into a conv costing ``after``."""
        if self.meter is None:
            return Decision(judge(self.policy, before, after))
        if candidate is None:
            return Decision(
                judge(Policy.FLOPS, before, after), note="judged by the flops rule: nothing to time"
            )
        if after.macs > MAX_LATENCY_MAC_RATIO * max(before.macs, 1):
            return Decision(
                Decline(
                    Reason.NOT_PROFITABLE,
                    f"merged conv would cost {after.macs:,} MACs/position against {before.macs:,} unmerged, "
                    f"over {MAX_LATENCY_MAC_RATIO}x: not timed",
                )
            )
        measured = self.meter.measure(candidate)
        if isinstance(measured, str):
            refused = judge(Policy.FLOPS, before, after)
            if refused is not None:
                refused = Decline(refused.reason, f"{refused.message}; judged by the flops rule: {measured}")
            return Decision(refused, note=f"judged by the flops rule: {measured}")
        return Decision(
            judge_latency(measured, self.meter.margin, f"ONNX Runtime {self.meter.device}"), measured
        )

    def notes(self) -> list[str]:
        """Report notes on the timings (none for the flops and always policies)."""
        return self.meter.notes() if self.meter is not None else []
