"""A super-resolution block family written the way its public code is (issue 16), in train form.

Five branches of one input summed: a 3x3 conv; a 1x1 (with bias) then a 3x3; three branches of a
1x1 (with bias) then a fixed depthwise 3x3 (Sobel x, Sobel y, Laplacian masks times a learned
per-channel scale, as ``F.conv2d(x, self.scale * self.mask, self.bias, groups=C)``). Between each
1x1 and its 3x3 the code pads explicitly and overwrites the border ring with the 1x1's bias by
slice assignment. ``fill`` and ``sides`` build the twins that must not merge (another value; a
side left zero); ``layer="bn"`` puts a BatchNorm in place of the 1x1 (its border is its shift).
"""

from __future__ import annotations

import io
import warnings
from collections import Counter

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SeqConv", "SRBlock", "SRBlockRep", "SRNet", "aten_ops", "export"]

_MASKS = {
    "sobelx": [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],
    "sobely": [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]],
    "laplacian": [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
}
SIDES = ("top", "bottom", "left", "right")


class SeqConv(nn.Module):
    """``k0`` (1x1 with bias, or a BN) then a 3x3 (``conv``) or a scaled fixed depthwise mask."""

    def __init__(
        self,
        kind: str,
        channels: int,
        *,
        layer: str = "conv",
        fill: float = 0.0,
        sides: tuple[str, ...] = SIDES,
    ) -> None:
        super().__init__()
        self.kind, self.fill, self.sides, self.channels = kind, fill, sides, channels
        self.k0: nn.Module = nn.Conv2d(channels, channels, 1) if layer == "conv" else nn.BatchNorm2d(channels)
        if kind == "conv":
            self.k1 = nn.Conv2d(channels, channels, 3)
        else:
            self.scale = nn.Parameter(torch.randn(channels, 1, 1, 1) * 1e-3 + 1.0)
            self.bias = nn.Parameter(torch.randn(channels) * 1e-3)
            mask = torch.zeros(channels, 1, 3, 3)
            mask[:, 0] = torch.tensor(_MASKS[kind])
            self.register_buffer("mask", mask)

    def border(self) -> torch.Tensor:
        """The value the ring is filled with: what ``k0`` maps zero to (plus ``fill``)."""
        if isinstance(self.k0, nn.Conv2d):
            b = self.k0.bias
        else:
            bn = self.k0
            b = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return b.view(1, -1, 1, 1) + self.fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.k0(x)
        y0 = F.pad(y0, (1, 1, 1, 1), "constant", 0)
        b0 = self.border()
        if "top" in self.sides:
            y0[:, :, 0:1, :] = b0
        if "bottom" in self.sides:
            y0[:, :, -1:, :] = b0
        if "left" in self.sides:
            y0[:, :, :, 0:1] = b0
        if "right" in self.sides:
            y0[:, :, :, -1:] = b0
        if self.kind == "conv":
            return self.k1(y0)
        return F.conv2d(y0, self.scale * self.mask, self.bias, stride=1, groups=self.channels)

    def rep_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The branch as one 3x3 kernel and bias, computed from the parameters as the public code
        does (device branch, a zero kernel filled channel by channel); conv ``k0`` only."""
        assert isinstance(self.k0, nn.Conv2d)
        device = self.k0.weight.get_device()
        if device < 0:
            device = None
        k0, b0 = self.k0.weight, self.k0.bias
        if self.kind == "conv":
            k1, b1 = self.k1.weight, self.k1.bias
        else:
            tmp = self.scale * self.mask
            k1 = torch.zeros((self.channels, self.channels, 3, 3), device=device)
            for i in range(self.channels):
                k1[i, i, :, :] = tmp[i, 0, :, :]
            b1 = self.bias
        rk = F.conv2d(input=k1, weight=k0.permute(1, 0, 2, 3))
        rb = torch.ones(1, self.channels, 3, 3, device=device) * b0.view(1, -1, 1, 1)
        rb = F.conv2d(input=rb, weight=k1).view(-1) + b1
        return rk, rb


class SRBlock(nn.Module):
    """The train-form block: ``conv3x3(x) + sum of the four SeqConv branches``."""

    def __init__(self, channels: int, **seq: object) -> None:
        super().__init__()
        self.conv3x3 = nn.Conv2d(channels, channels, 3, padding=1)
        kinds = ("conv", "sobelx", "sobely", "laplacian")
        self.branches = nn.ModuleList(SeqConv(k, channels, **seq) for k in kinds)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3x3(x)
        for branch in self.branches:
            y = y + branch(x)
        return y


class SRBlockRep(SRBlock):
    """The eval form: the same parameters, and a ``forward`` that builds the merged kernel with
    ``rep_params()`` on every call and runs one 3x3 conv (as the public code's eval branch does)."""

    def rep_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, b = self.conv3x3.weight, self.conv3x3.bias
        for branch in self.branches:
            rk, rb = branch.rep_params()
            k, b = k + rk, b + rb
        return k, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rk, rb = self.rep_params()
        return F.conv2d(input=x, weight=rk, bias=rb, stride=1, padding=1)


class SRNet(nn.Module):
    """A head conv, ``blocks`` SR blocks with a PReLU after each, and a pixel-shuffle tail;
    ``form="eval"`` uses :class:`SRBlockRep` blocks (``rep_params()`` in every forward)."""

    def __init__(self, channels: int = 16, blocks: int = 4, scale: int = 2, form: str = "train") -> None:
        super().__init__()
        block = SRBlockRep if form == "eval" else SRBlock
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(
            *(nn.Sequential(block(channels), nn.PReLU(channels)) for _ in range(blocks))
        )
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.tail(self.body(self.head(x))))


def _randomise_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def export(module: nn.Module, shape: tuple[int, ...], opset: int = 17) -> onnx.ModelProto:
    """``module`` (eval mode) exported by the TorchScript exporter without constant folding, at a
    static size."""
    module = module.eval()
    _randomise_bn(module)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and folding notices
        torch.onnx.export(
            module,
            (torch.randn(*shape),),
            buf,
            do_constant_folding=False,
            dynamo=False,
            opset_version=opset,
            input_names=["x"],
            output_names=["y"],
        )
    return onnx.load_from_string(buf.getvalue())


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def aten_ops(model: nn.Module, x: torch.Tensor) -> Counter[str]:
    """The ATen ops one forward of ``model`` on ``x`` runs, by name (modules and functional calls
    alike: what eager mode executes)."""
    with torch.no_grad(), _Count() as count:
        model(x)
    return count.ops
