"""Benchmark networks built in code: the train-form architectures convfuse is meant to collapse.

Every builder is deterministic (fixed seed), returns a module in eval mode with non-trivial
BatchNorm statistics (running mean/var calibrated on random data, then affine parameters
perturbed), and is small enough to time in seconds on 2 CPU cores. Use :func:`build` with a name
from :data:`MODELS`, or call a family builder (:func:`expandnet`, :func:`sesr`, :func:`repvgg`,
:func:`mobileone`, :func:`resnet`) with your own sizes.

All models are torch.fx traceable (no data-dependent control flow) so the torch front end can
see the same graph the ONNX exporter writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BenchModel",
    "MODELS",
    "build",
    "expandnet",
    "mobileone",
    "prepare",
    "repvgg",
    "resnet",
    "sesr",
]


# --------------------------------------------------------------------------- small pieces
def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Bias-free conv with 'same'-style symmetric padding, then BatchNorm: the train-form unit."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


def _head(channels: int, classes: int) -> nn.Sequential:
    """Global average pool and a linear classifier."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def _stem(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + BN + ReLU from image channels to the working width."""
    return nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU())


# --------------------------------------------------------------------------- ExpandNet
class ExpandBlock(nn.Module):
    """1x1 expand (no bias) -> kxk (padded) -> 1x1 project -> BN -> ReLU: C -> eC -> eC -> C.

    The first 1x1 has no bias so that the padded kxk after it sees zeros around a zero-bias
    pointwise output (DESIGN.md section 2, case 1): the whole chain is one exact kxk conv.
    """

    def __init__(self, channels: int, kernel: int, expansion: int) -> None:
        super().__init__()
        wide = channels * expansion
        self.expand = nn.Conv2d(channels, wide, 1, bias=False)
        self.spatial = nn.Conv2d(wide, wide, kernel, padding=kernel // 2)
        self.project = nn.Conv2d(wide, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.project(self.spatial(self.expand(x)))))


def expandnet(
    channels: int, blocks: int, kernel: int = 3, expansion: int = 4, in_channels: int = 3, classes: int = 10
) -> nn.Module:
    """ExpandNet-style classifier: stem, ``blocks`` expanded chains with ReLU between, head."""
    return nn.Sequential(
        _stem(in_channels, channels),
        *[ExpandBlock(channels, kernel, expansion) for _ in range(blocks)],
        _head(channels, classes),
    )


# --------------------------------------------------------------------------- SESR
class CollapsibleLinear(nn.Module):
    """kxk conv expanding to ``wide`` channels -> 1x1 projecting to ``cout`` (+ x if residual)."""

    def __init__(self, cin: int, cout: int, kernel: int, wide: int, residual: bool) -> None:
        super().__init__()
        self.expand = nn.Conv2d(cin, wide, kernel, padding=kernel // 2)
        self.project = nn.Conv2d(wide, cout, 1)
        self.residual = residual and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.expand(x))
        if self.residual:
            y = y + x
        return y


class SESR(nn.Module):
    """SESR-style super-resolution net (Bhardwaj et al., 2022) in its training (expanded) form.

    First 5x5 collapsible block, ``blocks`` 3x3 collapsible blocks with short residuals and PReLU,
    a long residual, a last 5x5 collapsible block to ``scale**2`` channels, the input added
    (broadcast), and depth-to-space.
    """

    def __init__(self, channels: int, wide: int, blocks: int, scale: int, in_channels: int = 1) -> None:
        super().__init__()
        self.first = CollapsibleLinear(in_channels, channels, 5, wide, residual=False)
        self.first_act = nn.PReLU(channels)
        self.body = nn.ModuleList(
            [CollapsibleLinear(channels, channels, 3, wide, residual=True) for _ in range(blocks)]
        )
        self.acts = nn.ModuleList([nn.PReLU(channels) for _ in range(blocks)])
        self.last = CollapsibleLinear(channels, in_channels * scale * scale, 5, wide, residual=False)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.first_act(self.first(x))
        y = x0
        for block, act in zip(self.body, self.acts):
            y = act(block(y))
        y = self.last(y + x0)
        return self.shuffle(y + x)


def sesr(channels: int = 16, wide: int = 128, blocks: int = 5, scale: int = 2) -> nn.Module:
    """SESR-style collapsible network (see :class:`SESR`)."""
    return SESR(channels, wide, blocks, scale)


# --------------------------------------------------------------------------- RepVGG
class RepVGGBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN (+ BN identity when shapes allow), summed, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dense = _conv_bn(cin, cout, 3, stride)
        self.point = _conv_bn(cin, cout, 1, stride)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.point(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


def repvgg(
    widths: Sequence[int], depths: Sequence[int], in_channels: int = 3, classes: int = 10
) -> nn.Module:
    """RepVGG-style classifier: each stage starts with a stride-2 block, then stride-1 blocks."""
    layers: list[nn.Module] = []
    cin = in_channels
    for width, depth in zip(widths, depths):
        for i in range(depth):
            layers.append(RepVGGBlock(cin, width, 2 if i == 0 else 1))
            cin = width
    return nn.Sequential(*layers, _head(cin, classes))


# --------------------------------------------------------------------------- MobileOne
class MobileOneUnit(nn.Module):
    """``k`` over-parameterized conv+BN branches (+ 1x1 scale branch) (+ BN identity), summed, ReLU.

    Depthwise units (``groups == cin``) use kxk branches and a 1x1 depthwise scale branch;
    pointwise units use 1x1 branches and no scale branch, as in MobileOne (Vasu et al., 2023).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int, k: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn(cin, cout, kernel, stride, groups) for _ in range(k)])
        if kernel > 1:
            self.branches.append(_conv_bn(cin, cout, 1, stride, groups))
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


def mobileone(
    widths: Sequence[int], depths: Sequence[int], k: int = 4, in_channels: int = 3, classes: int = 10
) -> nn.Module:
    """MobileOne-style classifier: stem, then depthwise 3x3 and pointwise 1x1 units per block."""
    layers: list[nn.Module] = [_stem(in_channels, widths[0], stride=2)]
    cin = widths[0]
    for width, depth in zip(widths, depths):
        for i in range(depth):
            stride = 2 if i == 0 else 1
            layers.append(MobileOneUnit(cin, cin, 3, stride, cin, k))
            layers.append(MobileOneUnit(cin, width, 1, 1, 1, k))
            cin = width
    return nn.Sequential(*layers, _head(cin, classes))


# --------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """conv3x3+BN+ReLU, conv3x3+BN, plus identity (or 1x1 conv+BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU(), *_conv_bn(cout, cout, 3))
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def resnet(
    widths: Sequence[int], depths: Sequence[int], in_channels: int = 3, classes: int = 10
) -> nn.Module:
    """ResNet-style classifier with basic blocks; convfuse can only fold BN here (a control case)."""
    layers: list[nn.Module] = [_stem(in_channels, widths[0])]
    cin = widths[0]
    for s, (width, depth) in enumerate(zip(widths, depths)):
        for i in range(depth):
            layers.append(BasicBlock(cin, width, 2 if i == 0 and s > 0 else 1))
            cin = width
    return nn.Sequential(*layers, _head(cin, classes))


# --------------------------------------------------------------------------- preparation
def prepare(module: nn.Module, input_shape: Sequence[int], seed: int, calibrate: bool = True) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, then switch to eval.

    PReLU slopes are drawn at random too (equal slopes would be shared by the ONNX exporter).
    With ``calibrate`` the running mean/var are the cumulative statistics of a few random batches
    (so activations stay in a realistic range); without it they are drawn at random (cheap, for
    the large pass-cost models). Then gamma and beta are perturbed away from 1 and 0.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for prelu in (m for m in module.modules() if isinstance(m, nn.PReLU)):
            prelu.weight.copy_(0.05 + 0.4 * torch.rand(prelu.weight.shape, generator=gen))
        if calibrate and bns:
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the calibration batches
            module.train()
            for _ in range(3):
                module(torch.randn((4, *input_shape[1:]), generator=gen))
        for bn in bns:
            c = bn.num_features
            if not calibrate:
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                bn.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            bn.weight.copy_(0.5 + torch.rand(c, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return module.eval()


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BenchModel:
    """A named benchmark network: how to build it and what input it takes (batch 1, NCHW)."""

    name: str
    family: str
    input_shape: tuple[int, ...]
    make: Callable[[], nn.Module]
    description: str
    latency: bool = True  # False: too large to time; used for pass time and memory only

    def build(self, seed: int = 0) -> nn.Module:
        """The module with fixed-seed weights and BN statistics, in eval mode."""
        torch.manual_seed(seed)
        module = self.make()
        return prepare(module, self.input_shape, seed, calibrate=self.latency)


def _m(
    name: str,
    family: str,
    shape: tuple[int, ...],
    make: Callable[[], nn.Module],
    desc: str,
    latency: bool = True,
) -> BenchModel:
    return BenchModel(name, family, shape, make, desc, latency)


#: Benchmark models by name, smallest first within each family.
MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in [
        _m(
            "expandnet-s",
            "expandnet",
            (1, 3, 32, 32),
            lambda: expandnet(8, 2),
            "ExpandNet chains C=8 (x4 expansion, 3x3), 2 blocks, 32x32",
        ),
        _m(
            "expandnet-m",
            "expandnet",
            (1, 3, 64, 64),
            lambda: expandnet(16, 3),
            "ExpandNet chains C=16 (x4 expansion, 3x3), 3 blocks, 64x64",
        ),
        _m(
            "expandnet-l",
            "expandnet",
            (1, 3, 32, 32),
            lambda: expandnet(64, 3),
            "ExpandNet chains C=64 (x4 expansion, 3x3), 3 blocks, 32x32",
        ),
        _m(
            "sesr",
            "sesr",
            (1, 1, 48, 48),
            lambda: sesr(16, 128, 5, 2),
            "SESR-style, 16 channels expanded to 128, 5 residual blocks, x2, 48x48",
        ),
        _m(
            "repvgg",
            "repvgg",
            (1, 3, 64, 64),
            lambda: repvgg((16, 32, 64, 128), (1, 2, 2, 1)),
            "RepVGG-style train form, widths 16-128, depths 1-2-2-1, 64x64",
        ),
        _m(
            "mobileone",
            "mobileone",
            (1, 3, 64, 64),
            lambda: mobileone((32, 64, 128), (1, 2, 2), k=4),
            "MobileOne-style train form, k=4 branches, widths 32-128, 64x64",
        ),
        _m(
            "resnet",
            "resnet",
            (1, 3, 64, 64),
            lambda: resnet((16, 32, 64), (2, 2, 2)),
            "ResNet-style basic blocks (conv+BN only), widths 16-64, 64x64",
        ),
        _m(
            "repvgg-wide",
            "repvgg",
            (1, 3, 32, 32),
            lambda: repvgg((64, 256, 512, 1024), (1, 2, 4, 3)),
            "wide RepVGG train form (~150 MB of fp32 weights), pass time/memory only",
            latency=False,
        ),
    ]
}


def build(name: str, seed: int = 0) -> nn.Module:
    """Build the benchmark model ``name`` (a key of :data:`MODELS`)."""
    try:
        return MODELS[name].build(seed)
    except KeyError:
        raise KeyError(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS)}") from None
