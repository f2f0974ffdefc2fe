"""Torch layers and calls as linear ops: what the torch importer reads before the planner's IR.

:mod:`.torch_rules` turns a layer or an fx call into a :class:`LinearOp` (a conv, a per-channel
or scalar affine, an identity, a zero pad, an average pool); :meth:`LinearOp.build` gives its
math (float64) for an input described by :class:`TensorInfo`, and :func:`as_spec` that math as
a ConvSpec. :mod:`.torch_import` wraps each op as a :class:`~convfuse.ir.LinearNode` for
:mod:`convfuse.planner`. No graph types here; each op carries an opaque ``origin`` the front
end uses to write it back unchanged.

Arithmetic runs in float64 numpy (torch constants are converted here, at the edge); merged
layers are cast back to the model's dtype and device when the front end writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...algebra import ChannelAffine, affine_conv, average_pool, identity
from ...algebra_linear import linear_spec
from ...decline import Decline, Reason
from ...spec import ConvSpec

__all__ = [
    "TensorInfo",
    "Math",
    "LinearOp",
    "ConvOp",
    "AffineOp",
    "IdentityOp",
    "RegroupOp",
    "PadOp",
    "PoolOp",
    "DenseOp",
    "as_spec",
    "numpy_dtype",
    "torch_dtype",
    "weight_dtype_device",
]

_F64 = np.float64


@dataclass(frozen=True)
class TensorInfo:
    """What an op is built for: the tensor it reads (a region's dtype and device included)."""

    channels: int
    ndim: int
    dtype: torch.dtype  # the model's dtype; merged convs are cast back to it
    device: Any  # torch.device of the model's weights
    batch: int | None = None  # known from shape propagation only (latency timing)
    spatial: tuple[int, ...] | None = None


Math = ConvSpec | ChannelAffine | None  # None: the identity map


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


@dataclass(eq=False, kw_only=True)
class ConvOp(LinearOp):
    """A convolution layer."""

    spec: ConvSpec
    dtype: Any = None  # torch dtype of the layer's weights (the spec holds a numpy view)
    device: Any = None

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
        dtype = self.dtype if self.dtype is not None else s.dtype
        if str(dtype).removeprefix("torch.") != str(info.dtype).removeprefix("torch."):
            return Decline(Reason.DTYPE, f"{self.name} holds {dtype} weights in a {info.dtype} region")
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
class RegroupOp(IdentityOp):
    """A reshape that keeps the last dim and regroups the others (``flatten(0, 1)``,
    ``reshape_as``): the identity on a Linear layer's features (IR layout ``REGROUP``)."""


@dataclass(eq=False)
class PadOp(LinearOp):
    """Zero padding of the last ``len(pads)`` spatial dims, ``pads`` in dim order."""

    pads: tuple[tuple[int, int], ...] = ()
    ndim: int | None = None

    def fixed_ndim(self) -> int | None:
        return self.ndim

    def build(self, info: TensorInfo) -> Math | Decline:
        if len(self.pads) > info.ndim:
            return Decline(
                Reason.UNSUPPORTED, f"{self.name} pads {len(self.pads)} dims of a {info.ndim}D tensor"
            )
        pads = ((0, 0),) * (info.ndim - len(self.pads)) + tuple(self.pads)
        return identity(info.channels, info.ndim, _F64).replace(pads=pads)


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
            return Decline(
                Reason.RANK_MISMATCH, f"{self.name} pools {len(self.kernel)}D on a {info.ndim}D tensor"
            )
        return average_pool(info.channels, self.kernel, self.stride, self.pads, _F64)


@dataclass(eq=False, kw_only=True)
class DenseOp(LinearOp):
    """``y = x W^T + b`` on the last dim (``nn.Linear``, ``F.linear``): a 1D pointwise conv."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def in_channels(self) -> int | None:
        return int(self.weight.shape[1])

    def build(self, info: TensorInfo) -> Math | Decline:
        if int(self.weight.shape[1]) != info.channels:
            return Decline(
                Reason.CHANNEL_MISMATCH,
                f"{self.name} expects {self.weight.shape[1]} features, gets {info.channels}",
            )
        if self.weight.dtype != info.dtype:
            return Decline(
                Reason.DTYPE, f"{self.name} holds {self.weight.dtype} weights in a {info.dtype} region"
            )
        bias = None if self.bias is None else self.bias.detach().to("cpu", torch.float64).numpy()
        return linear_spec(self.weight.detach().to("cpu", torch.float64).numpy(), bias)


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
) -> np.ndarray | Decline:
    """A constant as a ``[C]`` float64 numpy vector, or why broadcasting it is not per channel."""
    c = info.channels
    if value is None:
        return np.full(c, neutral, dtype=_F64)
    if not isinstance(value, torch.Tensor):
        if not math.isfinite(float(value)):
            return Decline(Reason.NON_FINITE, f"{name} uses the constant {value}")
        return np.full(c, float(value), dtype=_F64)
    t = value.detach()
    if t.is_complex() or t.dtype == torch.bool:
        return Decline(Reason.DTYPE, f"{name} multiplies by a {t.dtype} constant")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return Decline(Reason.NON_FINITE, f"{name} uses a constant with inf or nan values")
    if t.is_floating_point() and t.dim() > 0 and t.dtype != info.dtype:
        return Decline(Reason.DTYPE, f"{name} uses a {t.dtype} constant on a {info.dtype} tensor")
    if t.numel() == 1 and (vector or t.dim() <= info.ndim + 2):
        return np.full(c, float(t.reshape(())), dtype=_F64)
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
    return t.reshape(c).to(device="cpu", dtype=torch.float64).numpy()


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy one (a spec built without a layer's own dtype)."""
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


def numpy_dtype(dtype: torch.dtype) -> np.dtype | str:
    """The numpy dtype of a torch one, or its name where numpy has none (bfloat16: no timing model)."""
    name = str(dtype).removeprefix("torch.")
    try:
        return np.dtype(name)
    except TypeError:
        return name


def weight_dtype_device(op: LinearOp) -> tuple[torch.dtype, Any] | None:
    """The torch dtype and device of a conv's or Linear's weights (what a merge is written in)."""
    if isinstance(op, ConvOp):
        dtype = op.dtype if op.dtype is not None else torch_dtype(op.spec.dtype)
        return dtype, op.device if op.device is not None else torch.device("cpu")
    if isinstance(op, DenseOp):
        return op.weight.dtype, op.weight.device
    return None


def as_spec(m: Math, info: TensorInfo) -> ConvSpec:
    """Any math as a conv: identity is a Dirac kernel, an affine a depthwise 1x1."""
    if m is None:
        return identity(info.channels, info.ndim, _F64)
    if isinstance(m, ChannelAffine):
        return affine_conv(m, info.ndim)
    return m
