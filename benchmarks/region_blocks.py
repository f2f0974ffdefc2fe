"""Linear regions written the way public model code writes them (issue 11's table), and twins.

Each builder returns ``(module in eval mode with random BatchNorm statistics, example input)``.
The positive blocks collapse to one layer in their deploy form; each ``*_twin`` differs in one
place that makes the collapse inexact (a ReLU between branches, a padded copy with a non-zero
pad value, a subtracted tensor that is used elsewhere) and must not merge there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.vit_models import HybridViT, LinearActNorm, LinearNormOtherDim, LinearNormTransposed

__all__ = ["BLOCKS", "TWINS", "CASES", "randomize"]

Built = tuple[nn.Module, torch.Tensor]


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, eval mode (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return module.eval()


# --------------------------------------------------------------------------- token mixer
class ConvBN(nn.Sequential):
    """timm's ``ConvNormAct`` without activation: conv then BatchNorm."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class RepMixer(nn.Module):
    """A hybrid ViT's token mixer (FastViT ``RepMixer``): ``x + s * (mixer(x) - norm(x))`` with
    a depthwise conv+BN mixer, a BN norm and a per-channel layer scale. Deploy: one depthwise conv."""

    def __init__(self, dim: int, k: int = 3, relu: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.mixer = ConvBN(dim, dim, k, groups=dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5) + 0.1 * torch.randn(dim, 1, 1))
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mixer(x)
        if self.relu:  # twin: a ReLU between the branches
            mixed = F.relu(mixed)
        return x + self.layer_scale * (mixed - self.norm(x))


class RepMixerNormUsedElsewhere(RepMixer):
    """Twin: the subtracted ``norm(x)`` is also returned, so it must stay computed."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        n = self.norm(x)
        return x + self.layer_scale * (self.mixer(x) - n), n


class MixerStage(nn.Module):
    """Token mixers between 1x1 channel mixers, as a hybrid ViT stage writes them."""

    def __init__(self, dim: int, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RepMixer(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(
            nn.Sequential(ConvBN(dim, dim * 2, 1), nn.ReLU(), nn.Conv2d(dim * 2, dim, 1))
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mixer, mlp in zip(self.blocks, self.mlps):
            x = mixer(x)
            x = x + mlp(x)
        return x


# --------------------------------------------------------------------------- padded branch
class PaddedSRBlock(nn.Module):
    """A train-form SR block: ``conv_chain(F.pad(x)) + skip_1x1(x)``; the chain reads an
    explicitly zero-padded copy and its first conv is valid. Deploy: one 3x3."""

    def __init__(self, c: int, expand: int = 4, value: float = 0.0) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, c * expand, 3)
        self.project = nn.Conv2d(c * expand, c, 1)
        self.skip = nn.Conv2d(c, c, 1)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1), value=self.value)  # twin: a non-zero pad value
        return self.project(self.expand(padded)) + self.skip(x)


# --------------------------------------------------------------------------- heads
class BNLinear(nn.Sequential):
    """timm's ``NormLinear`` head: BatchNorm1d then Linear."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.l = nn.Linear(cin, cout)


class DistilledHead(nn.Module):
    """A distilled classifier: ``(head(x) + head_dist(x)) / 2`` of two BN1d -> Linear heads.
    Deploy: one Linear (Gemm)."""

    def __init__(self, cin: int, classes: int, relu: bool = False) -> None:
        super().__init__()
        self.head = BNLinear(cin, classes)
        self.head_dist = BNLinear(cin, classes)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.head(x)
        if self.relu:
            a = F.relu(a)
        return (a + self.head_dist(x)) / 2


# --------------------------------------------------------------------------- the planners' disagreements
def _expansion() -> Built:
    m = nn.Sequential(nn.Conv2d(8, 64, 1), nn.Conv2d(64, 8, 1), nn.Conv2d(8, 4, 3), nn.Conv2d(4, 8, 3))
    return m.eval(), torch.randn(1, 8, 12, 12)


class DepthwiseBranches(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw3 = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.dw1 = nn.Conv2d(c, c, 1, groups=c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw3(x) + self.dw1(x) + self.pw(x)


def _pool_chain() -> Built:
    m = nn.Sequential(nn.Conv2d(8, 16, 1), nn.AvgPool2d(3, 1, 1), nn.Conv2d(16, 8, 1))
    return m.eval(), torch.randn(1, 8, 10, 10)


def _long_chain(n: int = 60) -> Built:
    layers: list[nn.Module] = []
    for _ in range(n // 2):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)]
    return randomize(nn.Sequential(*layers), 5), torch.randn(1, 8, 8, 8)


class SharedConv(nn.Module):
    """One conv module called twice (shared weights): before a BN and before a 1x1."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bn(self.conv(x)), self.pw(self.conv(F.relu(x)))


def _seeded(build: Callable[[], nn.Module], shape: tuple[int, ...], seed: int) -> Callable[[], Built]:
    def make() -> Built:
        torch.manual_seed(seed)
        return randomize(build(), seed), torch.randn(*shape)

    return make


#: The table's blocks: name -> builder.
BLOCKS: dict[str, Callable[[], Built]] = {
    "token mixer x + s*(mixer(x) - bn(x))": _seeded(lambda: MixerStage(16), (1, 16, 14, 14), 1),
    "padded branch conv_chain(F.pad(x)) + skip(x)": _seeded(
        lambda: nn.Sequential(PaddedSRBlock(8), nn.ReLU(), PaddedSRBlock(8)), (1, 8, 16, 16), 2
    ),
    "distilled head (head(x) + head_dist(x)) / 2": _seeded(lambda: DistilledHead(32, 10), (4, 32), 3),
    "hybrid ViT: Linear+BN1d via flatten(0, 1)/reshape_as, conv+BN stem": _seeded(
        lambda: HybridViT(32, depth=2), (2, 3, 32, 32), 10
    ),
}

#: Negative twins: name -> builder (each must keep what its positive block merges).
TWINS: dict[str, Callable[[], Built]] = {
    "mixer with a ReLU between branches": _seeded(lambda: RepMixer(8, relu=True), (1, 8, 10, 10), 4),
    "mixer whose subtracted norm(x) is returned": _seeded(
        lambda: RepMixerNormUsedElsewhere(8), (1, 8, 10, 10), 5
    ),
    "padded branch with pad value 1": _seeded(lambda: PaddedSRBlock(8, value=1.0), (1, 8, 12, 12), 6),
    "head with a ReLU before the average": _seeded(lambda: DistilledHead(16, 6, relu=True), (4, 16), 7),
    "ViT block with an activation between Linear and BN": _seeded(
        lambda: HybridViT(16, depth=0, block=LinearActNorm(16, 16)), (2, 3, 32, 32), 11
    ),
    "ViT block with x.transpose(1, 2) before the BN": _seeded(
        lambda: HybridViT(16, depth=0, block=LinearNormTransposed(16, 16, tokens=16)), (2, 3, 32, 32), 12
    ),
    "ViT block whose BN reads flatten(1) (tokens x features)": _seeded(
        lambda: HybridViT(16, depth=0, block=LinearNormOtherDim(16, 16, tokens=16)), (2, 3, 32, 32), 13
    ),
}

#: The cases where the two planners used to disagree.
CASES: dict[str, Callable[[], Built]] = {
    "1x1 8->64, 1x1 64->8, 3x3 8->4, 3x3 4->8": _expansion,
    "depthwise 3x3 + depthwise 1x1 + dense 1x1": _seeded(DepthwiseBranches, (1, 8, 10, 10), 8),
    "1x1 -> AvgPool -> 1x1": _pool_chain,
    "one conv called twice (shared weights)": _seeded(SharedConv, (1, 8, 10, 10), 9),
    "60-layer conv/BN chain": _long_chain,
}
