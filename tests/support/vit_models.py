"""A hybrid ViT written the way LeViT-style public code writes it (issue 11, the table's 4th row).

A conv+BN stem (Conv2d-BN-Hardswish x3, stride 2), ``x.flatten(2).transpose(1, 2)`` to tokens,
then blocks of :class:`LinearNorm` modules (``nn.Linear`` without bias, then ``BatchNorm1d``
over the features through ``bn(x.flatten(0, 1)).reshape_as(x)``) as the q/k/v projections of
a softmax attention and as the two layers of a Hardswish MLP, each with a residual; a distilled
head ``(head(x) + head_dist(x)) / 2`` of two ``BN1d -> Linear`` on the mean-pooled tokens.

Deploy form (what LeViT's ``fuse`` gives): every LinearNorm one Linear, every ConvNorm one conv,
the two heads one Linear; no BatchNorm left.

Twins (:data:`TWINS` in :mod:`benchmarks.region_blocks`) change one LinearNorm: an activation
between the Linear and its BN, a transpose that moves the features to dim 1 before a BN over
another dim, a BN in training mode, a flatten whose BN reads a dim that is not the features.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "ConvNorm",
    "LinearNorm",
    "LinearActNorm",
    "LinearNormTransposed",
    "LinearNormOtherDim",
    "NormLinear",
    "Attention",
    "Mlp",
    "HybridViT",
]


class ConvNorm(nn.Sequential):
    """LeViT's ``Conv2d_BN``: conv without bias, then BatchNorm2d."""

    def __init__(self, a: int, b: int, k: int = 1, stride: int = 1, pad: int = 0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, k, stride, pad, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))


class LinearNorm(nn.Module):
    """LeViT's ``Linear_BN``: ``x = self.c(x); return self.bn(x.flatten(0, 1)).reshape_as(x)``."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.c = nn.Linear(a, b, bias=False)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LinearActNorm(LinearNorm):
    """Twin: a Hardswish between the Linear and its BN (not a per-channel affine of the Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.hardswish(self.c(x))
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LinearNormTransposed(LinearNorm):
    """Twin: ``x.transpose(1, 2)`` before the BN, which then normalises over the tokens
    (``[B, C, N]``: BatchNorm1d's channels are dim 1, the Linear's features are dim 2)."""

    def __init__(self, a: int, b: int, tokens: int) -> None:
        super().__init__(a, b)
        self.bn = nn.BatchNorm1d(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class LinearNormOtherDim(LinearNorm):
    """Twin: ``x.flatten(1)`` (``[B, N*C]``) before a BN over ``N*C`` features: the reshape mixes
    the tokens into the channel dim, so the BN is not per feature of the Linear."""

    def __init__(self, a: int, b: int, tokens: int) -> None:
        super().__init__(a, b)
        self.bn = nn.BatchNorm1d(tokens * b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        return self.bn(x.flatten(1)).reshape_as(x)


class NormLinear(nn.Sequential):
    """LeViT's ``BN_Linear``: BatchNorm1d then Linear (a classifier head)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b))


class Attention(nn.Module):
    """q, k, v as LinearNorm projections, softmax attention, then Hardswish and a LinearNorm."""

    def __init__(self, dim: int, key_dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.scale = key_dim**-0.5
        self.q = LinearNorm(dim, key_dim * heads)
        self.k = LinearNorm(dim, key_dim * heads)
        self.v = LinearNorm(dim, key_dim * heads)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(key_dim * heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3)
        k = self.k(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3)
        v = self.v(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class Mlp(nn.Sequential):
    """LinearNorm -> Hardswish -> LinearNorm."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.add_module("fc1", LinearNorm(dim, hidden))
        self.add_module("act", nn.Hardswish())
        self.add_module("fc2", LinearNorm(hidden, dim))


class Residual(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class HybridViT(nn.Module):
    """A small LeViT: conv+BN stem to 1/8 resolution, ``depth`` attention+MLP blocks, a
    distilled head. ``block`` replaces the MLP's first LinearNorm (a twin's variant)."""

    def __init__(
        self,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        key_dim: int = 8,
        classes: int = 10,
        block: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(
            ConvNorm(3, dim // 4, 3, 2, 1),
            nn.Hardswish(),
            ConvNorm(dim // 4, dim // 2, 3, 2, 1),
            nn.Hardswish(),
            ConvNorm(dim // 2, dim, 3, 2, 1),
        )
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks.append(Residual(Attention(dim, key_dim, heads)))
            blocks.append(Residual(Mlp(dim, dim * 2)))
        if block is not None:
            blocks.append(Residual(block))
        self.blocks = nn.Sequential(*blocks)
        self.head = NormLinear(dim, classes)
        self.head_dist = NormLinear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.blocks(x)
        x = x.mean(1)
        return (self.head(x) + self.head_dist(x)) / 2
