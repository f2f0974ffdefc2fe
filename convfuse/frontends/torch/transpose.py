"""Conversions between ``nn.ConvTranspose1d/2d/3d`` and :class:`~convfuse.transpose.ConvTransposeSpec`.

Plumbing only; the math lives in :mod:`convfuse.transpose`. torch pads transposed convs
symmetrically (``padding`` crops both ends, ``output_padding`` extends the end, and
``output_padding < max(stride, dilation)``), so a spec whose crops cannot be written that way
becomes ``Sequential(ConvTransposeNd(padding=0), Crop)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...decline import Decline, Reason
from ...ir import OpKind
from ...spec import InvalidSpecError, as_array
from ...transpose import ConvTransposeSpec
from .ops import ConvOp, Math, TensorInfo

__all__ = [
    "CONV_TRANSPOSE_TYPES",
    "ConvTransposeOp",
    "Crop",
    "spec_from_conv_transpose",
    "conv_transpose_from_spec",
]

CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ConvTransposeNd = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


def spec_from_conv_transpose(conv: ConvTransposeNd) -> ConvTransposeSpec:
    """Describe a torch transposed conv (its ``output_padding`` attribute; a forward called with
    ``output_size=`` chooses its own, which the caller must notice)."""
    if conv.padding_mode != "zeros":  # torch refuses this itself; say so in convfuse's words
        raise InvalidSpecError(f"{type(conv).__name__} pads in {conv.padding_mode!r} mode; only zeros exist")
    return ConvTransposeSpec(
        weight=as_array(conv.weight),
        bias=None if conv.bias is None else as_array(conv.bias),
        stride=tuple(conv.stride),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        pads=tuple((int(p), int(p)) for p in conv.padding),
        output_padding=tuple(conv.output_padding),
    )


class Crop(nn.Module):
    """Drop ``begin[i]`` leading and ``end[i]`` trailing positions of spatial dim ``i``."""

    def __init__(self, begin: tuple[int, ...], end: tuple[int, ...]) -> None:
        super().__init__()
        self.begin = tuple(begin)
        self.end = tuple(end)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (b, e) in enumerate(zip(self.begin, self.end)):
            if b or e:
                axis = 2 + i
                x = x.narrow(axis, b, x.shape[axis] - b - e)
        return x

    def extra_repr(self) -> str:
        return f"begin={self.begin}, end={self.end}"


def conv_transpose_from_spec(
    spec: ConvTransposeSpec, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A torch module computing ``spec``: one ``ConvTransposeNd`` where torch's symmetric
    ``padding`` and ``output_padding`` can say it, else ``Sequential(ConvTransposeNd, Crop)``.
    Weights are copied, never shared; ``dtype`` (default: the spec's) is the module's."""
    # torch types each class's sizes as a tuple of its own rank; here the rank is the spec's
    cls: Callable[..., nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d] = CONV_TRANSPOSE_TYPES[
        spec.ndim - 1
    ]
    limit = [max(s, d) for s, d in zip(spec.stride, spec.dilation)]
    one = spec.symmetric_form()
    if one is not None:
        padding, output_padding, crop = list(one[0]), list(one[1]), None
    else:
        padding = [0] * spec.ndim
        output_padding = [max(op - e, 0) for (_, e), op in zip(spec.pads, spec.output_padding)]
        crop = Crop(
            tuple(b for b, _ in spec.pads),
            tuple(max(e - op, 0) for (_, e), op in zip(spec.pads, spec.output_padding)),
        )
        if any(o >= m for o, m in zip(output_padding, limit)):
            raise InvalidSpecError(
                f"{spec!r} extends its output by {output_padding}, "
                f"not below max(stride, dilation) = {limit} as torch needs"
            )
    built = getattr(torch, np.dtype(spec.dtype).name)
    conv = cls(
        spec.in_channels,
        spec.out_channels,
        spec.kernel_size,
        stride=spec.stride,
        padding=tuple(padding),
        output_padding=tuple(output_padding),
        groups=spec.groups,
        bias=spec.bias is not None,
        dilation=spec.dilation,
        device=device,
        dtype=built,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(spec.weight)))
        if spec.bias is not None and conv.bias is not None:  # the one follows from the other
            conv.bias.copy_(torch.from_numpy(np.ascontiguousarray(spec.bias)))
    if dtype is not None:
        conv = conv.to(dtype=dtype)
    return conv if crop is None else nn.Sequential(conv, crop)


@dataclass(eq=False)
class ConvTransposeOp(ConvOp):
    """A transposed convolution layer or call (``ir_kind``: its IR kind); ``spec`` is a
    :class:`~convfuse.transpose.ConvTransposeSpec` in float64, ``dtype`` the layer's own."""

    ir_kind = OpKind.CONV_TRANSPOSE

    def build(self, info: TensorInfo) -> Math | Decline:
        s: Any = self.spec
        if s.ndim != info.ndim:
            return Decline(
                Reason.RANK_MISMATCH, f"{self.name} is a {s.ndim}D transposed conv on a {info.ndim}D tensor"
            )
        if s.in_channels != info.channels:
            return Decline(
                Reason.CHANNEL_MISMATCH, f"{self.name} expects {s.in_channels} channels, gets {info.channels}"
            )
        if str(self.dtype).removeprefix("torch.") != str(info.dtype).removeprefix("torch."):
            return Decline(Reason.DTYPE, f"{self.name} holds {self.dtype} weights in a {info.dtype} region")
        return s if s.dtype == np.float64 else s.astype(np.float64)  # the algebra's precision
