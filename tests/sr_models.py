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

import onnx
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SeqConv", "SRBlock", "SRNet", "export"]

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
        self.kind, self.fill, self.sides = kind, fill, sides
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
        return F.conv2d(y0, self.scale * self.mask, self.bias, stride=1, groups=y0.shape[1])


class SRBlock(nn.Module):
    """The train-form block: ``conv3x3(x) + sum of the four SeqConv branches``."""

    def __init__(self, channels: int, **seq: object) -> None:
        super().__init__()
        self.conv3x3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.branches = nn.ModuleList(SeqConv(k, channels, **seq) for k in ("conv", "sobelx", "sobely", "laplacian"))  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3x3(x)
        for branch in self.branches:
            y = y + branch(x)
        return y


class SRNet(nn.Module):
    """A head conv, ``blocks`` SR blocks with a PReLU after each, and a pixel-shuffle tail."""

    def __init__(self, channels: int = 16, blocks: int = 4, scale: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(
            *(nn.Sequential(SRBlock(channels), nn.PReLU(channels)) for _ in range(blocks))
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
