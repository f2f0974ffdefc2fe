"""Exact merges across a zero-padded border: one conv plus a constant border map (issue 14).

Pattern: ``x -> A -> B`` where ``B`` zero-pads ``A``'s output and ``A`` has a bias (DESIGN.md
section 2, case 2). ``A`` must have extent 1 along every dim where ``B`` pads (a pointwise ``A``;
:func:`convfuse.algebra.compose` decides this, as for case 1). Any strides, dilations, groups,
asymmetric pads, 1D/2D/3D. The derivation is in ``docs/border.md``; in short:

**Split.** Write ``A x = A0 x + bA`` (``A0``: ``A`` without bias). Zero padding and ``B`` are
linear, so ``B(pad0(A x)) = B(pad0(A0 x)) + Bnb(pad0(bA * 1))``, with ``Bnb`` = ``B`` without bias
and ``1`` a ones map of ``A``'s output size ``nA = A.output_size(n)``. The first term is the case-1
merge ``C = compose(A0, B)`` (exact). The second, ``K``, does not depend on ``x``.

**The constant.** With ``M[o, j] = sum_{c in group(o)} WB[o, c, j] * bA[c]`` (``B``'s taps weighted
by ``A``'s bias; shape ``[Co, *kB]``) and, per spatial dim ``d``, the 0/1 matrix of the taps that
land inside ``A``'s output::

    I_d[p, j] = [0 <= p*sB - pB_begin + j*dB < nA]          p < out_d, j < kB_d
    K[o, p]   = sum_j M[o, j] * prod_d I_d[p_d, j_d]         (a Tucker form: core M, factors I_d)

In the interior every tap lands (all ``I_d`` rows are ones), so ``K = Kint[o] = sum_j M[o, j]``: a
per-channel constant, folded into ``C``'s bias. The rest, the **ring** ``K - Kint``, is non-zero
only on the first ``ceil(pB_begin / sB)`` and last ``ceil(pB_end' / sB)`` output positions of each
dim, ``pB_end' = (out - 1)*sB - pB_begin + extB - nA`` being the end padding actually read (a
stride can drop it). Expanding ``prod_d (1 + (I_d - 1))`` gives the ring as a sum over non-empty
sets ``S`` of dims of terms ``R_S`` that depend on ``p_d, d in S`` only and vanish unless every
``p_d, d in S`` is on the ring: per-dim edge profiles (``|S| = 1``) plus corner terms
(``|S| >= 2``). So ``B(pad0(A x + bA)) = C'(x) + ring`` with ``C'`` = ``C`` with bias
``bC + Kint``.

**At run time.** ``K`` is one one-channel conv of a ones map: weight ``M[Co, 1, *kB]`` with ``B``'s
stride, dilation and pads on a ones map of size ``nA``; for an unpadded pointwise ``A`` the same on
``ones_like(x[:, :1])`` with stride ``sA*sB``, dilation ``sA*dB``, pads ``sA*pB``. With bias
``-Kint`` it gives the ring (:func:`ring_conv`, :func:`ring_from_ones`).

Declines: ``A`` with extent along a padded dim is case 3 (``padded-after-spatial``); a copy padding
mode (reflect, replicate, circular) after anything but a stride-1 unpadded pointwise ``A`` is
``padding-mode``; both come from :func:`~convfuse.algebra.compose` unchanged. Where ``B`` copies
instead of zero-pads (and ``compose`` accepts it), the copied border of a constant is the constant:
the ring is zero.

Numpy float64 throughout; the merged spec is cast back to ``A``'s dtype through
:func:`_to_spec_array`, the one place that knows which array type :class:`ConvSpec` holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

import numpy as np

from .algebra import compose
from .decline import Decline, Reason
from .spec import ConvSpec
from .transpose import _f64

__all__ = [
    "BorderMerge",
    "CorrectionCost",
    "border_ring",
    "compose_across_border",
    "correction_cost",
    "ring_conv",
    "ring_factors",
    "ring_from_ones",
    "ring_terms",
    "ring_widths",
]

#: numpy's name for each ConvSpec padding mode (a ones map padded in any of them).
_NP_PAD: dict[str, Literal["constant", "reflect", "edge", "wrap"]] = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}


def _to_spec_array(values: np.ndarray, like: Any) -> Any:
    """float64 ``values`` as the array type and dtype that ``like`` (a ConvSpec weight) has.

    The single adapter between this module's numpy math and :class:`ConvSpec`'s storage: torch
    tensors today (same dtype and device as ``like``), numpy arrays after issue 13.
    """
    if hasattr(like, "new_tensor"):
        return like.new_tensor(values)
    return np.asarray(values).astype(like.dtype)


# --------------------------------------------------------------------------- the result
@dataclass(frozen=True, eq=False)
class BorderMerge:
    """``B(pad0(A x + bA)) == spec(x) + border_ring(self, x_spatial)`` for every input size.

    ``spec``: the case-1 merge of bias-free ``A`` into ``B``, with ``interior`` added to its bias
    (``A``'s dtype). ``core``: ``M[Co, *kB]`` float64, ``B``'s taps weighted by ``A``'s bias (the
    Tucker core of the constant map; zero when ``A`` has no bias). ``interior``: ``Kint[Co] =
    core.sum(spatial)`` float64. ``first``/``second``: ``A`` and ``B``, whose geometry the ring
    functions read.
    """

    spec: ConvSpec
    core: np.ndarray
    interior: np.ndarray
    first: ConvSpec
    second: ConvSpec

    def out_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Output spatial size for an input (``x``) of spatial size ``spatial``."""
        out = self.second.output_size(self.first.output_size(spatial))
        if len(out) != self.spec.ndim or min(out) < 1:
            raise ValueError(
                f"input size {tuple(spatial)} gives no output {out} for {self.first} then {self.second}"
            )
        return out


@dataclass(frozen=True)
class CorrectionCost:
    """What the border correction costs at one input size, per sample (the batch broadcasts).

    ``needed`` is False when the ring is zero (nothing to add: then bytes and Add are 0).
    ``ring_elements``/``ring_bytes``: the dense constant ``[Co, *out]`` in the model's dtype;
    ``add_elements``: elements the extra ``Add`` writes; ``ring_positions``: output positions on
    the ring; ``runtime_macs``: the one-channel ones-map conv that builds it at run time;
    ``compact_elements``: the Tucker form (core plus per-dim factors).
    """

    out_spatial: tuple[int, ...]
    needed: bool
    ring_positions: int
    ring_elements: int
    ring_bytes: int
    add_elements: int
    runtime_macs: int
    compact_elements: int


# --------------------------------------------------------------------------- the rule
def compose_across_border(a: ConvSpec, b: ConvSpec) -> BorderMerge | Decline:
    """``A`` then ``B`` as one conv plus a constant border map (DESIGN.md case 2, exact).

    Conditions: those of :func:`~convfuse.algebra.compose` for bias-free ``A`` (its declines,
    case 3 and padding modes included, are returned unchanged). Algebra: see the module
    docstring. Case 1 (no bias) and an unpadded ``B`` come back with a zero ring.
    """
    merged = compose(a.replace(bias=None), b)
    if isinstance(merged, Decline):
        return merged
    core = _bias_weighted_taps(a, b)
    interior = core.reshape(core.shape[0], -1).sum(axis=1)
    spec = merged
    if a.bias is not None:
        bias = interior if merged.bias is None else _f64(merged.bias) + interior
        spec = merged.replace(bias=_to_spec_array(bias, merged.weight))
    return BorderMerge(spec=spec, core=core, interior=interior, first=a, second=b)


def _bias_weighted_taps(a: ConvSpec, b: ConvSpec) -> np.ndarray:
    """``M[o, j] = sum_{c in group(o)} WB[o, c, j] * bA[c]``, float64 ``[Co, *kB]``."""
    wb = _f64(b.weight)  # [Co, C1/gB, *kB]
    if a.bias is None:
        return np.zeros((wb.shape[0], *wb.shape[2:]))
    ba = _f64(a.bias).reshape(b.groups, 1, -1)  # [gB, 1, C1/gB]
    per_group = wb.reshape(b.groups, wb.shape[0] // b.groups, wb.shape[1], -1)  # [gB, Co/gB, C1/gB, K]
    m = np.einsum("goci,gxc->goi", per_group, ba)
    return m.reshape(wb.shape[0], *wb.shape[2:])


# --------------------------------------------------------------------------- the ring
def ring_factors(merge: BorderMerge, spatial: Sequence[int]) -> list[np.ndarray]:
    """Per dim, ``I_d[p, j] = 1`` where tap ``j`` of output ``p`` lands inside ``A``'s output.

    Float64 ``[out_d, kB_d]``; all ones for a copy padding mode (a copied constant is constant).
    ``K = core x_1 I_1 ... x_n I_n`` (Tucker form).
    """
    b = merge.second
    n_a = merge.first.output_size(spatial)
    out = merge.out_size(spatial)
    factors = []
    for dim in range(b.ndim):
        p = np.arange(out[dim])[:, None]
        j = np.arange(b.kernel_size[dim])[None, :]
        t = p * b.stride[dim] - b.pads[dim][0] + j * b.dilation[dim]
        inside = (t >= 0) & (t < n_a[dim]) if b.padding_mode == "zeros" else np.ones(t.shape, bool)
        factors.append(inside.astype(np.float64))
    return factors


def ring_terms(merge: BorderMerge, spatial: Sequence[int]) -> dict[tuple[int, ...], np.ndarray]:
    """The ring as a sum of terms over non-empty sets ``S`` of spatial dims.

    ``R_S[o, p_S] = sum_j M[o, j] * prod_{d in S} (I_d[p_d, j_d] - 1)``, shaped to broadcast
    against ``[Co, *out]`` (size 1 on dims outside ``S``) and exactly zero unless every
    ``p_d, d in S`` is on the ring: ``|S| = 1`` are per-dim edge profiles, ``|S| >= 2`` corner
    terms. Their broadcast sum is :func:`border_ring`.
    """
    factors = ring_factors(merge, spatial)
    n = len(factors)
    terms = {}
    for size in range(1, n + 1):
        for dims in combinations(range(n), size):
            term = merge.core
            for dim in reversed(range(n)):  # contract the last kernel axis first: axes stay put
                axis = dim + 1
                if dim in dims:
                    term = np.moveaxis(np.tensordot(term, factors[dim] - 1.0, axes=([axis], [1])), -1, axis)
                else:
                    term = term.sum(axis=axis, keepdims=True)
            terms[dims] = term
    return terms


def border_ring(merge: BorderMerge, spatial: Sequence[int]) -> np.ndarray:
    """The static correction ``ring[Co, *out]`` (float64) for input spatial size ``spatial``.

    ``B(pad0(A x + bA)) == merge.spec(x) + ring``; exactly zero off the ring (:func:`ring_widths`).
    """
    out = merge.out_size(spatial)
    ring = np.zeros((merge.core.shape[0], *out))
    for term in ring_terms(merge, spatial).values():
        ring += term
    return ring


def ring_widths(merge: BorderMerge, spatial: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Per dim, how many output positions at the begin and at the end are on the ring.

    ``ceil(pB_begin / sB)`` and ``ceil(pB_end' / sB)`` with ``pB_end' = (out - 1)*sB - pB_begin +
    extB - nA`` (the end padding the last output reads), each at most ``out``; the two overlap
    when the input is so small that the ring covers everything. Zero for copy padding modes.
    """
    b = merge.second
    n_a = merge.first.output_size(spatial)
    out = merge.out_size(spatial)
    if b.padding_mode != "zeros":
        return ((0, 0),) * b.ndim
    widths = []
    for o, na, (pb, _), s, ext in zip(out, n_a, b.pads, b.stride, b.extent):
        end_read = (o - 1) * s - pb + ext - na
        widths.append((min(-(-pb // s), o), min(-(-max(end_read, 0) // s), o)))
    return tuple(widths)


# --------------------------------------------------------------------------- at run time
@dataclass(frozen=True)
class _OnesConv:
    """Geometry of the one-channel conv that turns a ones map into ``K``."""

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]


def _ones_conv(merge: BorderMerge, on_input_grid: bool) -> _OnesConv | Decline:
    a, b = merge.first, merge.second
    if not on_input_grid:
        return _OnesConv(b.stride, b.dilation, b.pads)
    if not a.is_pointwise or a.is_padded:
        return Decline(
            Reason.UNSUPPORTED,
            f"the ring is a conv of ones on x's grid only after a pointwise, unpadded first conv "
            f"(kernel {a.kernel_size}, pads {a.pads}): build it on the first conv's output grid",
        )
    sa = a.stride
    return _OnesConv(
        tuple(x * y for x, y in zip(sa, b.stride)),
        tuple(x * y for x, y in zip(sa, b.dilation)),
        tuple((s * p0, s * p1) for s, (p0, p1) in zip(sa, b.pads)),
    )


def ring_conv(merge: BorderMerge, on_input_grid: bool = False) -> ConvSpec | Decline:
    """The conv that computes the ring from a one-channel ones map, for graphs of dynamic shape.

    Weight ``M[Co, 1, *kB]``, bias ``-Kint``, ``B``'s padding mode. Its input is ones of shape
    ``[N, 1, *A.output_size(n)]``, or with ``on_input_grid`` ``ones_like(x[:, :1])`` (stride
    ``sA*sB``, dilation ``sA*dB``, pads ``sA*pB``; pointwise unpadded ``A`` only, else a Decline).
    Its interior is zero up to rounding (``sum(M) - Kint``).
    """
    geometry = _ones_conv(merge, on_input_grid)
    if isinstance(geometry, Decline):
        return geometry
    like = merge.spec.weight
    co = merge.core.shape[0]
    return ConvSpec(
        weight=_to_spec_array(merge.core.reshape(co, 1, *merge.core.shape[1:]), like),
        bias=_to_spec_array(-merge.interior, like),
        stride=geometry.stride,
        dilation=geometry.dilation,
        pads=geometry.pads,
        padding_mode=merge.second.padding_mode,
    )


def ring_from_ones(merge: BorderMerge, spatial: Sequence[int], on_input_grid: bool = False) -> np.ndarray:
    """The ring as :func:`ring_conv` computes it at run time, in float64 numpy, for ``spatial``.

    Raises ``ValueError`` where :func:`ring_conv` declines ``on_input_grid``.
    """
    geometry = _ones_conv(merge, on_input_grid)
    if isinstance(geometry, Decline):
        raise ValueError(str(geometry))
    grid = tuple(spatial) if on_input_grid else merge.first.output_size(spatial)
    out = merge.out_size(spatial)
    ones = np.pad(np.ones(grid), geometry.pads, mode=_NP_PAD[merge.second.padding_mode])
    k = merge.core.shape[0]
    acc = np.zeros((k, *out))
    for tap in np.ndindex(*merge.core.shape[1:]):
        window = tuple(
            slice(j * d, j * d + (o - 1) * s + 1, s)
            for j, d, o, s in zip(tap, geometry.dilation, out, geometry.stride)
        )
        acc += merge.core[(slice(None), *tap)].reshape(k, *([1] * len(out))) * ones[window]
    return acc - merge.interior.reshape(k, *([1] * len(out)))


# --------------------------------------------------------------------------- cost
def correction_cost(merge: BorderMerge, spatial: Sequence[int]) -> CorrectionCost:
    """Bytes, Add elements and run-time MACs of the correction at input size ``spatial``."""
    out = merge.out_size(spatial)
    co = merge.core.shape[0]
    kernel = merge.core.shape[1:]
    widths = ring_widths(merge, spatial)
    interior = math.prod(max(o - b - e, 0) for o, (b, e) in zip(out, widths))
    needed = bool(np.any(border_ring(merge, spatial) != 0))
    elements = co * math.prod(out)
    return CorrectionCost(
        out_spatial=out,
        needed=needed,
        ring_positions=math.prod(out) - interior,
        ring_elements=elements if needed else 0,
        ring_bytes=elements * int(merge.spec.weight.itemsize) if needed else 0,
        add_elements=elements if needed else 0,
        runtime_macs=co * math.prod(kernel) * math.prod(out) if needed else 0,
        compact_elements=co * math.prod(kernel) + sum(o * k for o, k in zip(out, kernel)) if needed else 0,
    )
