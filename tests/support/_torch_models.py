"""Small versions of the re-parameterisable block styles, for the torch front-end tests.

Every BatchNorm gets random running statistics, gamma and beta so that folding it is not a
no-op. Blocks follow the published designs (RepVGG, ACNet, DBB, MobileOne, ExpandNets, SESR)
at toy sizes; ``make_*`` helpers return eval-mode models.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.support.helpers import rel_err as rel_error

__all__ = [
    "rand_bn",
    "randomize_bn",
    "conv_bn",
    "count_convs",
    "rel_error",
    "RepVGGBlock",
    "ACNetBlock",
    "DBBBlock",
    "MobileOneBlock",
    "ExpandedConv",
    "SESRBlock",
    "STYLES",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def randomize_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm in ``model`` (subclasses too) non-trivial inference statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    return model


def rand_bn(c: int, nd: int = 2) -> nn.Module:
    """BatchNorm with non-trivial inference statistics."""
    return randomize_bn(_BN[nd](c))


def conv_bn(c_in: int, c_out: int, k, stride=1, padding=0, groups=1, nd=2, bias=False, **kw) -> nn.Sequential:
    return nn.Sequential(
        _CONV[nd](c_in, c_out, k, stride=stride, padding=padding, groups=groups, bias=bias, **kw),
        rand_bn(c_out, nd),
    )


def count_convs(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules())


class RepVGGBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN + BN identity (when shapes allow), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, nd: int = 2) -> None:
        super().__init__()
        self.dense = conv_bn(c_in, c_out, 3, stride, 1, nd=nd)
        self.one = conv_bn(c_in, c_out, 1, stride, 0, nd=nd)
        self.identity = rand_bn(c_in, nd) if c_in == c_out and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class ACNetBlock(nn.Module):
    """kxk + 1xk + kx1 convs, each with BN, summed (asymmetric convolution block)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, mode: str = "zeros") -> None:
        super().__init__()
        p = k // 2
        self.square = conv_bn(c_in, c_out, (k, k), stride, (p, p))
        self.hor = conv_bn(c_in, c_out, (1, k), stride, (0, p), padding_mode=mode)
        self.ver = conv_bn(c_in, c_out, (k, 1), stride, (p, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.add(torch.add(self.square(x), self.hor(x)), self.ver(x)))


class DBBBlock(nn.Module):
    """Diverse Branch Block: kxk, 1x1, 1x1 -> avg pool, 1x1 -> kxk, each with BN.

    DBB's BNAndPad (pad the BN output with BN(0)) is written as a 1x1 conv without bias that
    pads its input: its border is conv(0) = 0, so the BN after it sees BN(0) there, the same
    function with standard layers. ``pad_late`` moves the padding to the kxk conv instead,
    which is not one conv (the negative twin).
    """

    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, pad_late: bool = False) -> None:
        super().__init__()
        p = k // 2
        self.dense = conv_bn(c_in, c_out, k, stride, p)
        self.one = conv_bn(c_in, c_out, 1, stride, 0)
        self.avg_1x1 = conv_bn(c_in, c_out, 1, 1, p)
        self.avg = nn.AvgPool2d(k, stride, 0)
        self.avg_bn = rand_bn(c_out)
        mid = c_in
        self.kxk_1x1 = conv_bn(c_in, mid, 1, 1, 0 if pad_late else p)
        self.kxk = conv_bn(mid, c_out, k, stride, p if pad_late else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x)
        out += self.one(x)
        out += self.avg_bn(self.avg(self.avg_1x1(x)))
        out += self.kxk(self.kxk_1x1(x))
        return torch.relu(out)


class MobileOneBlock(nn.Module):
    """MobileOne: ``n`` over-parameterised kxk conv+BN branches, a 1x1 conv+BN scale branch and
    a BN skip, summed with the builtin ``sum``; depthwise when ``groups == channels``."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, n: int = 3,
                 scale_groups: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(c_in, c_out, k, stride, k // 2, groups) for _ in range(n))
        self.scale = (
            conv_bn(c_in, c_out, 1, stride, 0, groups if scale_groups is None else scale_groups)
            if k > 1
            else None
        )
        self.skip = rand_bn(c_in) if c_in == c_out and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        if self.scale is not None:
            outs.append(self.scale(x))
        if self.skip is not None:
            outs.append(self.skip(x))
        return self.act(sum(outs))


class ExpandedConv(nn.Module):
    """ExpandNets: a kxk conv expanded to 1x1 (C -> rC) -> kxk (rC -> rC) -> 1x1 (rC -> C).

    The first 1x1 has no bias, so the padded kxk after it is exact (padding case 1);
    ``first_bias`` gives it one (case 2, the negative twin).
    """

    def __init__(self, c_in: int, c_out: int, k: int = 3, r: int = 4, first_bias: bool = False) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c_in, r * c_in, 1, bias=first_bias)
        self.spatial = nn.Conv2d(r * c_in, r * c_out, k, padding=k // 2)
        self.project = nn.Conv2d(r * c_out, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.spatial(self.expand(x)))


class SESRBlock(nn.Module):
    """SESR collapsible linear block: kxk expand (C -> E) -> 1x1 project (E -> C), plus x."""

    def __init__(self, c: int, e: int, k: int = 3, act_inside: bool = False) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, e, k, padding=k // 2)
        self.inner = nn.PReLU(e) if act_inside else nn.Identity()
        self.project = nn.Conv2d(e, c, 1)
        self.act = nn.PReLU(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.project(self.inner(self.expand(x))) + x)


def _repvgg() -> nn.Module:
    return nn.Sequential(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8), RepVGGBlock(8, 16, stride=2))


def _acnet() -> nn.Module:
    return nn.Sequential(ACNetBlock(3, 8), ACNetBlock(8, 8, k=5, stride=2))


def _dbb() -> nn.Module:
    return nn.Sequential(DBBBlock(3, 8), DBBBlock(8, 8, stride=2))


def _mobileone() -> nn.Module:
    return nn.Sequential(
        MobileOneBlock(8, 8, 3, groups=8),  # depthwise stage
        MobileOneBlock(8, 16, 1),  # pointwise stage
        MobileOneBlock(16, 16, 3, stride=2, groups=16),
        MobileOneBlock(16, 16, 1),
    )


def _expandnets() -> nn.Module:
    return nn.Sequential(
        ExpandedConv(3, 8), rand_bn(8), nn.ReLU(), ExpandedConv(8, 8, k=5), rand_bn(8), nn.ReLU()
    )


def _sesr() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.PReLU(8), SESRBlock(8, 32), SESRBlock(8, 32))


#: style -> (model factory, input channels, convs before, convs after)
STYLES = {
    "RepVGG": (_repvgg, 3, 6, 3),
    "ACNet": (_acnet, 3, 6, 2),
    "DBB": (_dbb, 3, 10, 2),
    "MobileOne": (_mobileone, 8, 14, 4),
    "ExpandNets": (_expandnets, 3, 6, 2),
    "SESR": (_sesr, 3, 5, 3),
}
