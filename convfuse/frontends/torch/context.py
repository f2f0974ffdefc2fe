"""State shared by one ``fuse()`` call over a module tree (the walk, the explainers and the
write-back read it), and the small helpers on module paths they all use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from torch import nn

from ...policy import Judge
from ...report import Report

_CONV = nn.modules.conv._ConvNd


_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


_Args = tuple[tuple[tuple[int, ...], torch.dtype], ...]  # shape and dtype of each positional argument


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


def _is_plain_sequential(module: nn.Module) -> TypeGuard[nn.Sequential]:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _named_sources(report: Report) -> set[str]:
    """Every layer name a merge or decline line of ``report`` mentions."""
    named = {s for m in report.merges for s in (*m.sources, m.target)}
    named |= {s for d in report.declines for s in d.sources}
    return named
