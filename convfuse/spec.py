"""The framework-neutral description of one linear convolution.

Every rule in :mod:`convfuse.algebra` is written against :class:`ConvSpec`; the torch and ONNX
front ends convert to and from it and never re-derive the algebra.

    y[o, p] = b[o] + sum_{c in group(o)} sum_j W[o, c, j] * xpad[c, p*s + j*d]

where ``xpad`` is the input padded by ``pads`` (begin, end per spatial dimension) in
``padding_mode``.

Weights are numpy arrays: the algebra and the ONNX path need no torch. A torch tensor handed in
is taken as a numpy view of its data (a copy only off the CPU or for bfloat16, which numpy
lacks); :meth:`ConvSpec.apply`, the test oracle, is the one part that runs torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._torch import is_torch_tensor, require_torch
from .errors import ConvfuseError

__all__ = [
    "PADDING_MODES",
    "ConvSpec",
    "InvalidSpecError",
    "as_array",
    "as_dtype",
    "is_shape_only",
    "same_pads",
    "shape_only",
]

#: Padding modes a convolution may use; ``zeros`` is the only one ONNX ``Conv`` has.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

Pads = tuple[tuple[int, int], ...]


class InvalidSpecError(ConvfuseError, ValueError):
    """The pieces handed to :class:`ConvSpec` do not describe a convolution."""


def as_array(value: Any) -> np.ndarray | Any:
    """``value`` as a numpy array when it is one or a torch tensor (a view of CPU data); anything
    else is returned as it is, for the caller to reject."""
    if isinstance(value, np.ndarray) or not is_torch_tensor(value):
        return value
    t = value.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
        t = t.float()
    return t.numpy()


#: The one element every shape-only array views (a NaN, so a value read by mistake shows).
_NO_DATA = np.full(1, np.nan)
_NO_DATA.flags.writeable = False


def shape_only(shape: Sequence[int]) -> np.ndarray:
    """A float64 array of ``shape`` that holds no data (every element views one NaN): the
    weight of a spec whose geometry is known before its values are computed."""
    return np.broadcast_to(_NO_DATA[0:1].reshape((1,) * len(shape)), tuple(shape))


def is_shape_only(array: np.ndarray | None) -> bool:
    """Whether ``array`` came from :func:`shape_only` (timing builds random values for it)."""
    return isinstance(array, np.ndarray) and np.may_share_memory(array, _NO_DATA)


def as_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype from a numpy dtype, a name, or a torch dtype of the same name."""
    name = str(dtype)
    try:
        return np.dtype(name.removeprefix("torch.") if name.startswith("torch.") else dtype)
    except TypeError:
        raise InvalidSpecError(f"no numpy element type for {dtype}") from None


@dataclass(frozen=True, eq=False)
class ConvSpec:
    """One convolution: ``weight[Co, Ci/groups, *k]``, ``bias[Co]`` or ``None``, and its geometry.

    ``pads`` holds ``(begin, end)`` for each spatial dimension, so asymmetric padding (ONNX
    ``pads``, torch ``padding='same'`` with even kernels) is represented exactly.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    pads: Pads = ()
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        w = as_array(self.weight)
        if not isinstance(w, np.ndarray) or w.ndim < 3 or w.ndim > 5:
            shape = tuple(w.shape) if isinstance(w, np.ndarray) else type(w).__name__
            raise InvalidSpecError(f"conv weight must be [Co, Ci/g, k1..kn] with n in 1..3, got {shape}")
        object.__setattr__(self, "weight", w)
        if self.bias is not None:
            bias = as_array(self.bias)
            if not isinstance(bias, np.ndarray):
                raise InvalidSpecError(f"conv bias must be an array, got {type(bias).__name__}")
            object.__setattr__(self, "bias", bias)
        n = w.ndim - 2
        # Fill in defaults so callers may omit geometry they do not use.
        if self.stride == ():
            object.__setattr__(self, "stride", (1,) * n)
        if self.dilation == ():
            object.__setattr__(self, "dilation", (1,) * n)
        if self.pads == ():
            object.__setattr__(self, "pads", ((0, 0),) * n)
        object.__setattr__(self, "stride", tuple(int(s) for s in self.stride))
        object.__setattr__(self, "dilation", tuple(int(d) for d in self.dilation))
        object.__setattr__(self, "pads", tuple((int(b), int(e)) for b, e in self.pads))
        object.__setattr__(self, "groups", int(self.groups))
        if len(self.stride) != n or len(self.dilation) != n or len(self.pads) != n:
            raise InvalidSpecError(
                f"conv with weight {tuple(w.shape)} needs {n} strides, dilations and pads, got "
                f"stride={self.stride} dilation={self.dilation} pads={self.pads}"
            )
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise InvalidSpecError(f"strides and dilations must be >= 1, got {self.stride}, {self.dilation}")
        if min(min(p) for p in self.pads) < 0:
            raise InvalidSpecError(f"pads must be >= 0, got {self.pads}")
        if self.groups < 1 or w.shape[0] % self.groups:
            raise InvalidSpecError(f"groups={self.groups} does not divide {w.shape[0]} output channels")
        if self.padding_mode not in PADDING_MODES:
            raise InvalidSpecError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if self.bias is not None and tuple(self.bias.shape) != (w.shape[0],):
            raise InvalidSpecError(
                f"bias shape {tuple(self.bias.shape)} does not match weight {tuple(w.shape)}"
            )

    # ----------------------------------------------------------------- shape facts
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (1, 2 or 3)."""
        return self.weight.ndim - 2

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def extent(self) -> tuple[int, ...]:
        """Size of the window one output reads, with dilation: ``d * (k - 1) + 1``."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype

    @property
    def is_padded(self) -> bool:
        return any(b or e for b, e in self.pads)

    @property
    def is_pointwise(self) -> bool:
        """Kernel of size 1 in every spatial dimension."""
        return all(k == 1 for k in self.kernel_size)

    def bias_or_zeros(self) -> np.ndarray:
        if self.bias is not None:
            return self.bias
        return np.zeros(self.out_channels, dtype=self.weight.dtype)

    def has_nonzero_bias(self) -> bool:
        return self.bias is not None and bool(np.any(self.bias != 0))

    def output_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Output spatial size for an input of spatial size ``spatial``."""
        return tuple(
            (n + b + e - x) // s + 1 for n, (b, e), x, s in zip(spatial, self.pads, self.extent, self.stride)
        )

    def macs_per_position(self) -> int:
        """Multiply-accumulates for one output position (all output channels)."""
        return self.out_channels * int(self.weight.shape[1]) * math.prod(self.kernel_size)

    def params(self) -> int:
        """Weight and bias element count."""
        return self.weight.size + (0 if self.bias is None else self.bias.size)

    def to(self, dtype: Any) -> ConvSpec:
        """The same convolution with weight and bias in ``dtype`` (no copy when they already are)."""
        dt = as_dtype(dtype)
        if self.weight.dtype == dt and (self.bias is None or self.bias.dtype == dt):
            return self
        bias = None if self.bias is None else self.bias.astype(dt, copy=False)
        return replace(self, weight=self.weight.astype(dt, copy=False), bias=bias)

    def replace(self, **changes: Any) -> ConvSpec:
        """A copy with ``changes`` applied (the spec itself is immutable)."""
        return replace(self, **changes)

    # ----------------------------------------------------------------- evaluation
    def apply(self, x: Any) -> Any:
        """Run this convolution on the torch tensor ``x`` (``[N, Ci, *spatial]``); the test oracle.

        The one torch API of this module: torch is imported here, never for the algebra.
        """
        torch = require_torch("ConvSpec.apply")
        F = torch.nn.functional
        flat = [p for b, e in reversed(self.pads) for p in (b, e)]
        if any(flat):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, flat, mode=mode)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.ndim - 1]
        weight = torch.from_numpy(np.array(self.weight)).to(x.device, x.dtype)  # a copy: never a view of ours
        bias = None if self.bias is None else torch.from_numpy(np.array(self.bias)).to(x.device, x.dtype)
        return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)

    def __repr__(self) -> str:
        return (
            f"ConvSpec(weight={tuple(self.weight.shape)}, bias={self.bias is not None}, "
            f"stride={self.stride}, dilation={self.dilation}, groups={self.groups}, "
            f"pads={self.pads}, padding_mode={self.padding_mode!r}, dtype={self.dtype})"
        )


def same_pads(kernel: Sequence[int], dilation: Sequence[int], upper: bool = True) -> Pads:
    """Padding that keeps the spatial size at stride 1 (torch ``'same'`` is ``upper=True``).

    The odd element of an odd total goes at the end for ``upper`` (ONNX ``SAME_UPPER``, torch
    ``'same'``) and at the beginning otherwise (ONNX ``SAME_LOWER``).
    """
    pads = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        small = total // 2
        pads.append((small, total - small) if upper else (total - small, small))
    return tuple(pads)
