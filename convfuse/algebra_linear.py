"""The pieces a linear region needs beyond :mod:`convfuse.algebra`: scaled branches, Linear layers.

Tensors only, written against :class:`~convfuse.spec.ConvSpec` and the algebra's public rules,
so they work on whatever array type the spec holds. DESIGN.md section 5 (linear regions):

- **Scaling a branch** by a constant ``c`` (``-b``, ``a - b``, ``s * b``): ``W' = c W``,
  ``b' = c b`` (:func:`scaled`), the per-channel affine rule with scale ``c`` and shift 0.
- **A padded branch** (``F.pad(x)`` zero, then a valid conv): the readers give a zero pad as
  the identity conv with those pads, which composes exactly with a following conv (it only
  moves where the conv reads zeros); a zero pad *after* a spatial conv is padding case 3 of the
  algebra and is declined there.
- **Linear** ``y = x W^T + b`` on the last dim is a conv with no spatial extent: a 1D pointwise
  conv ``W[Co, Ci, 1]`` on a virtual length-1 grid (:func:`linear_spec`); every rule of the
  algebra applies unchanged, and :func:`as_matrix` reads the dense ``[Co, Ci]`` matrix back.
- **Identity** (a branch that is the input itself): a Dirac kernel (:func:`convfuse.algebra.identity`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .algebra import ChannelAffine, then_affine
from .decline import Decline
from .spec import ConvSpec, InvalidSpecError

__all__ = ["scaled", "without_zero_bias", "linear_spec", "as_matrix"]


def scaled(spec: ConvSpec, factor: float) -> ConvSpec | Decline:
    """``factor * spec(x)``: weight and bias times ``factor`` (``-1`` for a subtracted branch)."""
    if factor == 1:
        return spec
    zeros = spec.bias_or_zeros() * 0
    return then_affine(spec, ChannelAffine(scale=zeros + float(factor), shift=zeros))


def without_zero_bias(spec: ConvSpec) -> ConvSpec:
    """The same map without its bias when that bias is all zero (both writers drop it)."""
    return spec if spec.has_nonzero_bias() or spec.bias is None else spec.replace(bias=None)


def linear_spec(weight: Any, bias: Any = None) -> ConvSpec:
    """``y = x W^T + b`` (``weight[Co, Ci]``) as a 1D pointwise conv ``[Co, Ci, 1]``."""
    return ConvSpec(weight=weight[:, :, None], bias=bias)


def as_matrix(spec: ConvSpec) -> tuple[Any, Any]:
    """The dense ``[Co, Ci]`` matrix and bias of a 1D pointwise conv (block diagonal when grouped)."""
    if spec.ndim != 1 or not spec.is_pointwise or spec.is_padded or spec.stride != (1,):
        raise InvalidSpecError(f"{spec!r} is not a Linear layer")
    w = spec.weight[:, :, 0]
    if spec.groups == 1:
        return w, spec.bias
    co_g, ci_g = spec.out_channels // spec.groups, w.shape[1]
    dense = np.zeros((spec.out_channels, spec.in_channels), dtype=w.dtype)
    for g in range(spec.groups):
        dense[g * co_g : (g + 1) * co_g, g * ci_g : (g + 1) * ci_g] = w[g * co_g : (g + 1) * co_g]
    return dense, spec.bias
