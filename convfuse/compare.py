"""How far a candidate tensor is from its reference, and where on the image grid it is wrong.

Pure numpy, no model runtimes: the verifier's judgement in one place.

    passed  <=>  max |candidate - reference| <= rtol * max |reference| + atol

The tolerance is relative to the tensor's scale (its max magnitude), not element by element:
a fused conv's rounding error is proportional to the magnitudes it accumulates, and elements
near zero would otherwise demand impossible precision. Integer and bool tensors match exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CONTRAST", "DEFAULT_RTOL", "Comparison", "compare", "error_map", "locate", "tolerance_for"]

#: Default relative tolerance per dtype, as a fraction of the tensor's max |reference|.
#: Measured (16 RepVGG-style blocks, 3x3 + 1x1 + identity, merged in float64 and cast back, vs
#: the unmerged blocks in the same dtype): float32 1.4e-6, float16 2.6e-3, bfloat16 1.3e-2,
#: float64 2e-15. Each default sits above that with margin and below what a fusion bug produces
#: (DESIGN.md section 4: float32 ~1e-6 is typical, 1e-4 is a bug).
DEFAULT_RTOL: dict[str, float] = {
    "float64": 1e-9,
    "float32": 1e-5,
    "float16": 1e-2,
    "bfloat16": 5e-2,
}


def tolerance_for(
    dtype: str, rtol: float | None = None, atol: float | None = None
) -> tuple[float, float, bool]:
    """``(rtol, atol, exact)`` for a tensor of ``dtype``: the caller's values over the defaults.

    Integer and bool tensors are exact whatever the caller asks: a tolerance on an index or a
    mask has no meaning.
    """
    if dtype not in DEFAULT_RTOL:
        return 0.0, 0.0, True
    return (
        DEFAULT_RTOL[dtype] if rtol is None else float(rtol),
        0.0 if atol is None else float(atol),
        False,
    )


@dataclass(frozen=True)
class Comparison:
    """How far a candidate is from the reference for one tensor (all samples together)."""

    max_abs_error: float  # inf when non-finite values disagree
    scale: float  # max |reference| over its finite values
    tolerance: float  # rtol * scale + atol (0 when exact)
    mismatched: int  # elements beyond the tolerance
    total: int
    location: str | None = None  # "border", "interior" or "everywhere" for a failing image tensor
    border_width: int | None = None  # ring width when location == "border"
    interior_max_abs_error: float | None = None  # inside that ring when location == "border"
    #: For a failing image tensor: max |error| per spatial position over samples, batch and
    #: channels (:func:`error_map`; inf where non-finite values disagree), else None.
    error_map: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def max_rel_error(self) -> float:
        """Max abs error over the scale (the max abs error itself when the scale is 0)."""
        return self.max_abs_error / self.scale if self.scale > 0 else self.max_abs_error

    @property
    def passed(self) -> bool:
        return self.mismatched == 0


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    rtol: float,
    atol: float,
    exact: bool = False,
    spatial_from: int | None = None,
) -> Comparison:
    """Compare two same-shaped arrays against ``rtol * max|reference| + atol`` (or exactly).

    Non-finite values must agree position by position (NaN with NaN, +inf with +inf); a
    disagreement is an infinite error. ``spatial_from`` is the first spatial axis of an image
    tensor (3 for ``[samples, N, C, H, W]``): a failing one gets a :func:`locate` verdict.
    """
    if exact:
        bad = reference != candidate
        diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
        magnitude = np.abs(reference.astype(np.float64))
        scale = float(magnitude.max()) if magnitude.size else 0.0
        tol = 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
    else:
        ref = reference.astype(np.float64, copy=False)
        cand = candidate.astype(np.float64, copy=False)
        ref_finite = np.isfinite(ref)
        both_finite = ref_finite & np.isfinite(cand)
        same_special = (ref == cand) | (np.isnan(ref) & np.isnan(cand))
        special_differs = ~both_finite & ~same_special
        diff = np.abs(np.subtract(ref, cand, out=np.zeros(ref.shape), where=both_finite))
        scale = float(np.abs(ref[ref_finite]).max()) if ref_finite.any() else 0.0
        tol = rtol * scale + atol
        bad = (diff > tol) | special_differs
        max_abs = math.inf if special_differs.any() else (float(diff.max()) if diff.size else 0.0)
    mismatched = int(np.count_nonzero(bad))
    location = width = interior = worst = None
    if mismatched and spatial_from is not None and reference.ndim > spatial_from:
        error = np.where(bad & ~(diff > tol), math.inf, diff)  # non-finite disagreements count as inf
        worst = error_map(error, spatial_from)
        location, width = locate(error, tol, spatial_from)
        if location == "border" and width is not None:
            interior = float(_interior(diff, spatial_from, width).max())
    return Comparison(max_abs, scale, tol, mismatched, int(bad.size), location, width, interior, worst)


def error_map(error: np.ndarray, spatial_from: int) -> np.ndarray:
    """Max of ``error`` per position of the grid of axes ``spatial_from`` onwards (over all
    leading axes: samples, batch, channels)."""
    return error.reshape(-1, *error.shape[spatial_from:]).max(axis=0)


#: A border (or interior) error must be this many times the error elsewhere to be named so.
CONTRAST = 10.0


def locate(error: np.ndarray, tolerance: float, spatial_from: int) -> tuple[str | None, int | None]:
    """Where ``error`` exceeds ``tolerance`` on the grid of axes ``spatial_from`` onwards.

    ``("border", w)``: every failure lies within ``w`` of an edge (``w <= max(1, min(min(spatial)
    // 4, 8))``), an interior is left inside that ring, and the ring's worst error is at least
    :data:`CONTRAST` times the interior's: right in the middle, wrong at the edge, the signature
    of a padding mistake. ``("interior", None)``: likewise with the outermost ring clean.
    ``("everywhere", None)`` otherwise (errors of one size that cross the tolerance here and
    there are noise, not a place). ``(None, None)``: nothing fails, or a spatial size is below 3.
    """
    spatial = error.shape[spatial_from:]
    if not spatial or min(spatial) < 3:
        return None, None
    worst = error_map(error, spatial_from)
    failing = worst > tolerance
    if not failing.any():
        return None, None
    distance = _edge_distance(spatial)
    width = int(distance[failing].max()) + 1
    if width <= max(1, min(min(spatial) // 4, 8)) and (min(spatial) - 1) // 2 >= width:
        ring, inside = worst[distance < width].max(), worst[distance >= width].max()
        return ("border", width) if ring >= CONTRAST * inside else ("everywhere", None)
    if int(distance[failing].min()) >= 1:
        ring, inside = worst[distance == 0].max(), worst[distance >= 1].max()
        if inside >= CONTRAST * ring:
            return "interior", None
    return "everywhere", None


def _edge_distance(spatial: Sequence[int]) -> np.ndarray:
    """Distance of each position of a ``spatial`` grid to its nearest edge."""
    per_axis = [np.minimum(np.arange(n), n - 1 - np.arange(n)) for n in spatial]
    return np.minimum.reduce(np.meshgrid(*per_axis, indexing="ij"))


def _interior(values: np.ndarray, spatial_from: int, width: int) -> np.ndarray:
    """``values`` without a ring of ``width`` on every spatial axis."""
    inner = tuple(slice(width, n - width) for n in values.shape[spatial_from:])
    return values[(slice(None),) * spatial_from + inner]
