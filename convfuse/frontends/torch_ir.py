"""Torch layers and calls as linear ops: what the torch importer reads before the planner's IR.

:mod:`.torch_rules` turns a layer or an fx call into a :class:`LinearOp` (a conv, a per-channel
or scalar affine, an identity, a zero pad, an average pool); :meth:`LinearOp.build` gives its
math (float64) for an input described by :class:`TensorInfo`, and :func:`as_spec` that math as
a ConvSpec. :mod:`.torch_import` wraps each op as a :class:`~convfuse.ir.LinearNode` for
:mod:`convfuse.planner`. No graph types here; each op carries an opaque ``origin`` the front
end uses to write it back unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from ..algebra import ChannelAffine, affine_conv, average_pool, identity
from ..algebra_linear import linear_spec
from ..decline import Decline, Reason
from ..spec import ConvSpec

__all__ = [
    "TensorInfo",
    "Math",
    "LinearOp",
    "ConvOp",
    "AffineOp",
    "IdentityOp",
    "PadOp",
    "PoolOp",
    "DenseOp",
    "as_spec",
]

_F64 = torch.float64


@dataclass(frozen=True)
class TensorInfo:
    """What an op is built for: the tensor it reads (a region's dtype and device included)."""

    channels: int
    ndim: int
    dtype: torch.dtype  # the model's dtype; merged convs are cast back to it
    device: torch.device
    batch: int | None = None  # known from shape propagation only (latency timing)
    spatial: tuple[int, ...] | None = None


Math = Union[ConvSpec, ChannelAffine, None]  # None: the identity map


# --------------------------------------------------------------------------- ops
@dataclass(eq=False)
class LinearOp:
    """One layer of the model that is a linear map; ``origin`` lets the front end keep it as is."""

    name: str
    origin: Any = field(default=None, repr=False)

    #: Spatial rank this op fixes (convs, typed pools and pads), or None.
    def fixed_ndim(self) -> int | None:
        return None

    #: Channels this op requires at its input, or None when it preserves any channel count.
    def in_channels(self) -> int | None:
        return None

    def build(self, info: TensorInfo) -> Math | Decline:
        """The op as float64 math for an input described by ``info``."""
        raise NotImplementedError



@dataclass(eq=False)
class ConvOp(LinearOp):
    """A convolution layer."""

    spec: ConvSpec | None = None

    def fixed_ndim(self) -> int | None:
        return self.spec.ndim

    def in_channels(self) -> int | None:
        return self.spec.in_channels

    def build(self, info: TensorInfo) -> Math | Decline:
        s = self.spec
        if s.ndim != info.ndim:
            return Decline(Reason.RANK_MISMATCH, f"{self.name} is a {s.ndim}D conv on a {info.ndim}D tensor")
        if s.in_channels != info.channels:
            return Decline(
                Reason.CHANNEL_MISMATCH, f"{self.name} expects {s.in_channels} channels, gets {info.channels}"
            )
        if s.dtype != info.dtype:
            return Decline(Reason.DTYPE, f"{self.name} holds {s.dtype} weights in a {info.dtype} region")
        return s.to(_F64)


@dataclass(eq=False)
class AffineOp(LinearOp):
    """``y = scale * x + shift`` with per-channel or scalar constants (BN, Mul/Add/Sub/Div, neg).

    ``vector`` says the constants are ``[C]`` vectors along the channel dim (BatchNorm);
    otherwise they are broadcast against ``[N, C, *spatial]`` as torch would.
    """

    scale: torch.Tensor | float | None = None
    shift: torch.Tensor | float | None = None
    vector: bool = False
    ndim: int | None = None

    def fixed_ndim(self) -> int | None:
        return self.ndim

    def in_channels(self) -> int | None:
        sizes = {_channel_size(t, self.vector) for t in (self.scale, self.shift)} - {None}
        return sizes.pop() if len(sizes) == 1 else None

    def build(self, info: TensorInfo) -> Math | Decline:
        scale = _per_channel(self.scale, info, self.vector, self.name, 1.0)
        if isinstance(scale, Decline):
            return scale
        shift = _per_channel(self.shift, info, self.vector, self.name, 0.0)
        if isinstance(shift, Decline):
            return shift
        return ChannelAffine(scale=scale, shift=shift)


@dataclass(eq=False)
class IdentityOp(LinearOp):
    """Identity, eval-mode Dropout, add of zero: transparent."""

    def build(self, info: TensorInfo) -> Math | Decline:
        return None


@dataclass(eq=False)
class PadOp(LinearOp):
    """Zero padding of the last ``len(pads)`` spatial dims, ``pads`` in dim order."""

    pads: tuple[tuple[int, int], ...] = ()
    ndim: int | None = None

    def fixed_ndim(self) -> int | None:
        return self.ndim

    def build(self, info: TensorInfo) -> Math | Decline:
        if len(self.pads) > info.ndim:
            return Decline(Reason.UNSUPPORTED, f"{self.name} pads {len(self.pads)} dims of a {info.ndim}D tensor")
        pads = ((0, 0),) * (info.ndim - len(self.pads)) + tuple(self.pads)
        spec = identity(info.channels, info.ndim, _F64)
        return spec.replace(weight=spec.weight.to(info.device), pads=pads)


@dataclass(eq=False)
class PoolOp(LinearOp):
    """Average pooling whose padding counts in the divisor (a uniform depthwise conv)."""

    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    pads: tuple[tuple[int, int], ...] = ()

    def fixed_ndim(self) -> int | None:
        return len(self.kernel)

    def build(self, info: TensorInfo) -> Math | Decline:
        if len(self.kernel) != info.ndim:
            return Decline(Reason.RANK_MISMATCH, f"{self.name} pools {len(self.kernel)}D on a {info.ndim}D tensor")
        spec = average_pool(info.channels, self.kernel, self.stride, self.pads, _F64)
        return spec.replace(weight=spec.weight.to(info.device))


@dataclass(eq=False)
class DenseOp(LinearOp):
    """``y = x W^T + b`` on the last dim (``nn.Linear``, ``F.linear``): a 1D pointwise conv."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def in_channels(self) -> int | None:
        return int(self.weight.shape[1])

    def build(self, info: TensorInfo) -> Math | Decline:
        if int(self.weight.shape[1]) != info.channels:
            return Decline(
                Reason.CHANNEL_MISMATCH, f"{self.name} expects {self.weight.shape[1]} features, gets {info.channels}"
            )
        if self.weight.dtype != info.dtype:
            return Decline(Reason.DTYPE, f"{self.name} holds {self.weight.dtype} weights in a {info.dtype} region")
        bias = None if self.bias is None else self.bias.detach().to(_F64)
        return linear_spec(self.weight.detach().to(_F64), bias)


# --------------------------------------------------------------------------- helpers: constants
def _channel_size(value: torch.Tensor | float | None, vector: bool) -> int | None:
    """The channel count a constant pins down, if any (its one non-unit dim)."""
    if not isinstance(value, torch.Tensor) or value.numel() == 1:
        return None
    if vector:
        return int(value.numel())
    big = [int(n) for n in value.shape if n != 1]
    return big[0] if len(big) == 1 else None


def _per_channel(
    value: torch.Tensor | float | None, info: TensorInfo, vector: bool, name: str, neutral: float
) -> torch.Tensor | Decline:
    """A constant as a ``[C]`` float64 vector, or why broadcasting it is not per channel."""
    c = info.channels
    if value is None:
        return torch.full((c,), neutral, dtype=_F64, device=info.device)
    if not isinstance(value, torch.Tensor):
        if not math.isfinite(float(value)):
            return Decline(Reason.NON_FINITE, f"{name} uses the constant {value}")
        return torch.full((c,), float(value), dtype=_F64, device=info.device)
    t = value.detach()
    if t.is_complex() or t.dtype == torch.bool:
        return Decline(Reason.DTYPE, f"{name} multiplies by a {t.dtype} constant")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return Decline(Reason.NON_FINITE, f"{name} uses a constant with inf or nan values")
    if t.is_floating_point() and t.dim() > 0 and t.dtype != info.dtype:
        return Decline(Reason.DTYPE, f"{name} uses a {t.dtype} constant on a {info.dtype} tensor")
    if t.numel() == 1 and (vector or t.dim() <= info.ndim + 2):
        return torch.full((c,), float(t.reshape(())), dtype=_F64, device=info.device)
    if vector:
        shape_ok = t.dim() == 1 and t.numel() == c
    else:
        rank = info.ndim + 2
        shape = (1,) * (rank - t.dim()) + tuple(t.shape) if t.dim() <= rank else None
        shape_ok = shape is not None and shape[1] == c and all(n == 1 for i, n in enumerate(shape) if i != 1)
    if not shape_ok:
        return Decline(
            Reason.CHANNEL_MISMATCH,
            f"{name} uses a constant of shape {tuple(t.shape)}, not one value per channel of a "
            f"[N, {c}, ...] tensor with {info.ndim} spatial dims",
        )
    return t.reshape(c).to(device=info.device, dtype=_F64)


def as_spec(m: Math, info: TensorInfo) -> ConvSpec:
    """Any math as a conv: identity is a Dirac kernel, an affine a depthwise 1x1."""
    if m is None:
        spec = identity(info.channels, info.ndim, _F64)
        return spec.replace(weight=spec.weight.to(info.device))
    if isinstance(m, ChannelAffine):
        return affine_conv(m, info.ndim)
    return m


