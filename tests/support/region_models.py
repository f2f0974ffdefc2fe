"""Random linear regions as torch modules, written the way model code writes them (for the
property tests of the one planner): branches of one input combined by ``+``, ``-`` and
scales, or concatenated and mixed; regions chained between ReLUs; Linear heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["Region", "Head", "RegionNet", "HeadNet", "regions", "heads"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@dataclass(frozen=True)
class Branch:
    first: str  # "same3", "same1", "pad+valid", "identity", "pool", "bn"
    after: tuple[str, ...]  # "1x1", "bn"
    sign: float  # +1 or -1 (a subtracted branch)
    scale: str  # "none", "scalar", "channel"


@dataclass(frozen=True)
class Region:
    branches: tuple[Branch, ...]
    combine: str  # "sum" or "concat"
    mix: str  # after a concat: "1x1" or "bn+1x1"; after a sum: "none", "1x1", "bn"


@dataclass(frozen=True)
class Head:
    before_bn: bool
    after_bn: bool
    parallel: int  # heads averaged


_branch = st.builds(
    Branch,
    st.sampled_from(["same3", "same1", "pad+valid", "identity", "pool", "bn"]),
    st.lists(st.sampled_from(["1x1", "bn"]), max_size=2).map(tuple),
    st.sampled_from([1.0, -1.0]),
    st.sampled_from(["none", "scalar", "channel"]),
)


@st.composite
def regions(draw: st.DrawFn) -> Region:
    # At most one pool-first branch: exporters merge identical pools of one input into one node.
    branches = list(
        draw(
            st.lists(
                _branch, min_size=2, max_size=4, unique_by=lambda b: b.first if b.first == "pool" else id(b)
            )
        )
    )
    if not any(b.first in ("same3", "same1", "pad+valid") for b in branches):
        branches[0] = Branch("same3", branches[0].after, branches[0].sign, branches[0].scale)
    combine = draw(st.sampled_from(["sum", "sum", "concat"]))
    mix = draw(st.sampled_from(["1x1", "bn+1x1"] if combine == "concat" else ["none", "1x1", "bn"]))
    return Region(tuple(branches), combine, mix)


heads = st.builds(Head, st.booleans(), st.booleans(), st.integers(1, 3))


class _BranchModule(nn.Module):
    def __init__(self, b: Branch, c: int, ndim: int) -> None:
        super().__init__()
        conv, bn, pool = _CONV[ndim - 1], _BN[ndim - 1], _POOL[ndim - 1]
        self.b = b
        self.first: nn.Module
        if b.first == "same3":
            self.first = conv(c, c, 3, padding="same")
        elif b.first == "same1":
            self.first = conv(c, c, 1)
        elif b.first == "pad+valid":
            self.first = conv(c, c, 3)  # after an explicit F.pad
        elif b.first == "pool":
            self.first = pool(3, 1, 1, count_include_pad=True)
        elif b.first == "bn":
            self.first = bn(c)
        else:
            self.first = nn.Identity()
        self.after = nn.ModuleList(conv(c, c, 1) if a == "1x1" else bn(c) for a in b.after)
        self.ndim = ndim
        self.gamma = nn.Parameter(torch.rand(c, *([1] * ndim)) + 0.5) if b.scale == "channel" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.b.first == "pad+valid":
            x = F.pad(x, (1, 1) * self.ndim)
        y = self.first(x)
        for layer in self.after:
            y = layer(y)
        if self.b.scale == "scalar":
            y = y * 0.75
        elif self.gamma is not None:
            y = self.gamma * y
        return y


class _RegionModule(nn.Module):
    def __init__(self, r: Region, c: int, ndim: int) -> None:
        super().__init__()
        conv, bn = _CONV[ndim - 1], _BN[ndim - 1]
        self.r = r
        self.branches = nn.ModuleList(_BranchModule(b, c, ndim) for b in r.branches)
        wide = c * len(r.branches) if r.combine == "concat" else c
        mix: list[nn.Module] = []
        if "bn" in r.mix:
            mix.append(bn(wide))
        if "1x1" in r.mix:
            mix.append(conv(wide, c, 1))
        self.mix = nn.Sequential(*mix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r.combine == "concat":
            y = torch.cat([branch(x) for branch in self.branches], dim=1)
        else:
            y = self.branches[0](x)
            if self.r.branches[0].sign < 0:
                y = -y
            for b, branch in zip(self.r.branches[1:], self.branches[1:]):
                y = y + branch(x) if b.sign > 0 else y - branch(x)
        return self.mix(y)


class RegionNet(nn.Module):
    """Regions one after another, a ReLU between them (each region is one exact linear map)."""

    def __init__(self, rs: list[Region], c: int, ndim: int) -> None:
        super().__init__()
        self.regions = nn.ModuleList(_RegionModule(r, c, ndim) for r in rs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, region in enumerate(self.regions):
            x = region(F.relu(x) if k else x)
        return x


class _HeadModule(nn.Sequential):
    def __init__(self, h: Head, cin: int, cout: int) -> None:
        layers: list[nn.Module] = [nn.BatchNorm1d(cin)] if h.before_bn else []
        layers.append(nn.Linear(cin, cout))
        if h.after_bn:
            layers.append(nn.BatchNorm1d(cout))
        super().__init__(*layers)


class HeadNet(nn.Module):
    """A pooled feature through ``parallel`` BN1d/Linear heads, averaged."""

    def __init__(self, h: Head, cin: int, cout: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(_HeadModule(h, cin, cout) for _ in range(h.parallel))
        self.n = h.parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.heads[0](x)
        for head in self.heads[1:]:
            y = y + head(x)
        return y / self.n if self.n > 1 else y
