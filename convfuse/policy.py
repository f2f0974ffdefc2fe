"""When a merge pays (DESIGN.md section 3). Shared by both front ends."""

from __future__ import annotations

from enum import Enum

from .algebra import Cost
from .decline import Decline, Reason

__all__ = ["Policy", "judge"]


class Policy(str, Enum):
    """``flops``: never increase MACs or parameters. ``always``: every exact merge."""

    FLOPS = "flops"
    ALWAYS = "always"
    LATENCY = "latency"  # measured by the front end; judged here like FLOPS as a first filter

    @classmethod
    def parse(cls, value: str | Policy) -> Policy:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown policy {value!r}; choose one of {names}") from None


def judge(policy: Policy | str, before: Cost, after: Cost) -> Decline | None:
    """``None`` when the merge should be made under ``policy``, else the reason it is not."""
    if Policy.parse(policy) is Policy.ALWAYS or after <= before:
        return None
    return Decline(
        Reason.NOT_PROFITABLE,
        f"merged conv would cost {after.macs:,} MACs/position and {after.params:,} parameters "
        f"against {before.macs:,} and {before.params:,} unmerged (use policy 'always' to merge anyway)",
    )
