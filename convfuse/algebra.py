"""The exact rules that turn several linear convolutions into one.

Arrays only (numpy; no torch, no graph types here). Every rule takes
:class:`~convfuse.spec.ConvSpec` values and returns either a new ``ConvSpec`` that computes
exactly the same function (in real arithmetic) or a :class:`~convfuse.decline.Decline` saying
why it cannot. Arithmetic runs in float64 and the result is cast back to the first operand's
dtype. See ``DESIGN.md`` section 2 for the derivations; each rule below restates its pattern,
conditions and algebra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np

from .decline import Decline, Reason
from .spec import ConvSpec, InvalidSpecError, as_array, as_dtype

__all__ = [
    "ChannelAffine",
    "Cost",
    "MAX_MERGED_ELEMENTS",
    "add",
    "affine_conv",
    "average_pool",
    "compose",
    "compose_chain",
    "concat",
    "cost",
    "identity",
    "simplify",
    "then_affine",
]

#: Largest merged weight (elements, float64 during the computation) a rule will build.
MAX_MERGED_ELEMENTS = 1 << 27


# --------------------------------------------------------------------------- small values
@dataclass(frozen=True, eq=False)
class ChannelAffine:
    """``y[c] = scale[c] * x[c] + shift[c]``: inference BatchNorm, or per-channel Mul/Add."""

    scale: np.ndarray
    shift: np.ndarray

    def __post_init__(self) -> None:
        for name in ("scale", "shift"):
            value = as_array(getattr(self, name))
            if not isinstance(value, np.ndarray):
                raise InvalidSpecError(f"per-channel {name} must be an array, got {type(value).__name__}")
            object.__setattr__(self, name, value)

    @classmethod
    def from_batchnorm(
        cls,
        mean: np.ndarray,
        var: np.ndarray,
        gamma: np.ndarray | None,
        beta: np.ndarray | None,
        eps: float,
    ) -> ChannelAffine:
        """Inference BatchNorm: ``a = gamma / sqrt(var + eps)``, shift ``beta - mean * a``
        (float64, then cast to the statistics' dtype)."""
        mean, var = as_array(mean), as_array(var)
        mean64, var64 = _f64(mean), _f64(var)
        gamma64 = np.ones_like(mean64) if gamma is None else _f64(as_array(gamma))
        beta64 = np.zeros_like(mean64) if beta is None else _f64(as_array(beta))
        with np.errstate(divide="ignore", invalid="ignore"):
            a = gamma64 / np.sqrt(var64 + eps)
            shift = beta64 - mean64 * a
        return cls(scale=a.astype(mean.dtype, copy=False), shift=shift.astype(mean.dtype, copy=False))

    @property
    def channels(self) -> int:
        return int(self.scale.size)


@dataclass(frozen=True)
class Cost:
    """Multiply-accumulates (per output position of the final layer) and parameters."""

    macs: int
    params: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.params + other.params)

    def __le__(self, other: Cost) -> bool:
        return self.macs <= other.macs and self.params <= other.params


def cost(specs: Sequence[ConvSpec]) -> Cost:
    """Cost of running ``specs`` one after another, normalised to the last one's output grid.

    An earlier layer with a smaller cumulative stride produces more positions per final output
    position; its MACs are scaled by that ratio (border effects ignored). For parallel branches
    call this per branch and add: the branches share one output grid.
    """
    macs = 0.0
    total_stride = [1] * specs[-1].ndim
    for spec in specs:
        total_stride = [t * s for t, s in zip(total_stride, spec.stride)]
    cumulative = [1] * specs[-1].ndim
    for spec in specs:
        cumulative = [c * s for c, s in zip(cumulative, spec.stride)]
        macs += spec.macs_per_position() * math.prod(t / c for t, c in zip(total_stride, cumulative))
    return Cost(int(round(macs)), sum(s.params() for s in specs))


# --------------------------------------------------------------------------- weight helpers
def _f64(a: np.ndarray) -> np.ndarray:
    """``a`` in float64: the array itself when it already is (no copy), else one cast."""
    return np.asarray(a, dtype=np.float64)


def _ungroup(w: np.ndarray, groups: int, target: int) -> np.ndarray:
    """Re-express a ``groups``-grouped weight as ``target``-grouped (``target`` divides ``groups``).

    ``w[Co, Ci/groups, *k]`` becomes ``[Co, Ci/target, *k]``: each coarse group holds
    ``groups/target`` fine groups on its block diagonal and zeros elsewhere.
    """
    r = groups // target
    if r == 1:
        return w
    co, cig = w.shape[0], w.shape[1]
    k = tuple(w.shape[2:])
    fine = w.reshape(target, r, co // groups, cig, *k)
    out = np.zeros((target, r, co // groups, r, cig, *k), dtype=w.dtype)
    idx = np.arange(r)
    out[:, idx, :, idx] = fine.swapaxes(0, 1)
    return out.reshape(co, r * cig, *k)


def _largest_groups(mag: np.ndarray, groups: int) -> int:
    """Largest multiple of ``groups`` for which a weight is block diagonal (exact zeros), from
    ``mag[Co, Ci/g]``: whether each (output, input) channel pair has a non-zero tap."""
    co, cig = mag.shape
    per_out = co // groups
    best = 1
    if bool(mag.all()):
        return groups  # dense: no block structure to find
    for m in range(2, min(per_out, cig) + 1):
        if per_out % m or cig % m:
            continue
        blocks = mag.reshape(groups, m, per_out // m, m, cig // m)
        off = np.asarray(blocks.any(axis=(0, 2, 4)))  # [m, m]
        np.fill_diagonal(off, False)
        if not bool(off.any()):
            best = m
    return groups * best


def simplify(spec: ConvSpec) -> ConvSpec:
    """The same function with the fewest taps and the most groups the weight allows.

    Three exact rewrites: (1) zero-tap borders are trimmed while padding can absorb them (the
    read offset ``-begin + j*d`` of every kept tap is unchanged); (2) taps spaced by a common
    factor ``f`` become a kernel dilated by ``d*f``; (3) a weight that is block diagonal in exact
    zeros gets the larger group count. The zero pattern is read once, as a ``[Co*Ci/g, taps]``
    mask reduced along each side (no pass over the weight per dimension).
    """
    w = spec.weight
    if w.size == 0 or np.count_nonzero(w) == w.size:  # dense: nothing to trim, no blocks to find
        dense = tuple(1 if k == 1 else d for k, d in zip(spec.kernel_size, spec.dilation))
        return spec.replace(weight=np.ascontiguousarray(w), dilation=dense)
    co, cig = w.shape[0], w.shape[1]
    nonzero = (w != 0).reshape(co * cig, -1)
    taps = nonzero.any(axis=0).reshape(w.shape[2:])  # [*k]: taps non-zero in some channel pair
    mag = nonzero.any(axis=1).reshape(co, cig)  # channel pairs with some non-zero tap
    pads: list[tuple[int, int]] = list(spec.pads)
    dilation: list[int] = list(spec.dilation)
    for dim in range(spec.ndim):
        axis = dim + 2
        others = tuple(a for a in range(taps.ndim) if a != dim)
        nz = np.flatnonzero(taps.any(axis=others) if others else taps).tolist()
        if not nz:
            continue
        d = dilation[dim]
        begin, end = pads[dim]
        lead = min(nz[0], begin // d)
        trail = min(w.shape[axis] - 1 - nz[-1], end // d)
        step = 1
        if lead or trail:
            pads[dim] = (begin - lead * d, end - trail * d)
            nz = [i - lead for i in nz]
        size = w.shape[axis] - lead - trail
        if nz[0] == 0 and nz[-1] == size - 1 and len(nz) > 1:
            f = reduce(math.gcd, nz[1:])
            if f > 1:
                step = f
                dilation[dim] = d * f
        if lead or trail or step > 1:
            index = [slice(None)] * w.ndim
            index[axis] = slice(lead, w.shape[axis] - trail, step)
            w = w[tuple(index)]
            t_index = [slice(None)] * taps.ndim
            t_index[dim] = slice(lead, taps.shape[dim] - trail, step)
            taps = taps[tuple(t_index)]
        if w.shape[axis] == 1:
            dilation[dim] = 1
    groups = _largest_groups(mag, spec.groups)
    if groups != spec.groups:
        r = groups // spec.groups
        cig = w.shape[1] // r
        co_fine = w.shape[0] // groups
        k = tuple(w.shape[2:])
        blocks = w.reshape(spec.groups, r, co_fine, r, cig, *k)
        idx = np.arange(r)
        w = blocks[:, idx, :, idx].swapaxes(0, 1).reshape(w.shape[0], cig, *k)
    return spec.replace(
        weight=np.ascontiguousarray(w), pads=tuple(pads), dilation=tuple(dilation), groups=groups
    )


def _too_large(elements: int, what: str) -> Decline | None:
    if elements > MAX_MERGED_ELEMENTS:
        return Decline(
            Reason.TOO_LARGE,
            f"{what} would need {elements:,} weight elements, over the limit of {MAX_MERGED_ELEMENTS:,}",
        )
    return None


# --------------------------------------------------------------------------- rule: A then B
def compose(a: ConvSpec, b: ConvSpec) -> ConvSpec | Decline:
    """Sequential composition: one conv ``C`` with ``C(x) == b(a(x))``.

    Pattern: ``x -> a -> b``. Conditions: ranks and channels agree; where ``b`` pads, padding
    ``a``'s output must equal padding ``a``'s input (see :func:`_check_b_padding`: DESIGN.md
    case 1 exact, cases 2 and 3 declined).
    Algebra: stride ``sA*sB``; taps of ``a`` dilated by ``dA``, of ``b`` by ``dB*sA``;
    ``C[o, i] = sum_c fullconv(A[c, i], B[o, c])`` computed as tap products
    (:func:`_tap_products`: no multiplication by a zero tap); padding
    ``pA + sA*pB`` per side in ``a``'s mode (``b``'s if only ``b`` pads); bias
    ``bB + sum_{c,j} B[o, c, j] * bA[c]``; grouped by ``gcd(gA, gB)`` then by whatever further
    block structure the weight has.
    """
    if a.ndim != b.ndim:
        return Decline(Reason.RANK_MISMATCH, f"{a.ndim}D conv feeds a {b.ndim}D conv")
    if a.out_channels != b.in_channels:
        return Decline(
            Reason.CHANNEL_MISMATCH,
            f"first conv has {a.out_channels} output channels, second expects {b.in_channels}",
        )
    padded_dims = [i for i, (pb, pe) in enumerate(b.pads) if pb or pe]
    if padded_dims:
        decline = _check_b_padding(a, b, padded_dims)
        if decline is not None:
            return decline
    mode = b.padding_mode if padded_dims else "zeros"
    if a.is_padded:
        mode = a.padding_mode
    keep_bias = a.bias is not None or b.bias is not None  # as the general route below
    merged: ConvSpec | Decline | None
    if _is_channel_scale(b):  # conv then BN: no dense C x C intermediate
        merged = then_affine(a, _scale_of(b))
    elif _is_channel_scale(a):  # BN then conv (padding already checked above)
        merged = _scale_inputs(_scale_of(a), b).replace(padding_mode=mode)
    else:
        merged = None
    if isinstance(merged, Decline):
        return merged
    if merged is not None:
        return simplify(merged.replace(bias=merged.bias if keep_bias else None)).to(a.dtype)

    g = math.gcd(a.groups, b.groups)
    sa = a.stride
    ext_a = a.extent
    ext_b = [db * s * (k - 1) + 1 for k, db, s in zip(b.kernel_size, b.dilation, sa)]
    k_c = [x + y - 1 for x, y in zip(ext_a, ext_b)]
    ci_g = a.in_channels // g
    too_big = _too_large(b.out_channels * ci_g * math.prod(k_c), "merging these convs")
    if too_big:
        return too_big

    wc = _tap_products(a, b, g, tuple(k_c))  # [Co, Ci/g, *K]

    bias = None
    if a.bias is not None or b.bias is not None:
        bias = _f64(b.bias_or_zeros())
        if a.bias is not None:
            wb_sum = _f64(b.weight).sum(axis=tuple(range(2, b.weight.ndim)))  # [Co, C1/gB]
            ba = _f64(a.bias).reshape(b.groups, -1, 1)  # [gB, C1/gB, 1]
            bias = bias + (wb_sum.reshape(b.groups, -1, wb_sum.shape[1]) @ ba).reshape(-1)

    dtype = a.dtype
    merged = ConvSpec(
        weight=wc,
        bias=bias,
        stride=tuple(x * y for x, y in zip(a.stride, b.stride)),
        dilation=(1,) * a.ndim,
        groups=g,
        pads=tuple((pa0 + s * pb0, pa1 + s * pb1) for (pa0, pa1), (pb0, pb1), s in zip(a.pads, b.pads, sa)),
        padding_mode=mode,
    )
    return simplify(merged).to(dtype)


def _tap_products(a: ConvSpec, b: ConvSpec, g: int, size: tuple[int, ...]) -> np.ndarray:
    """The weight of ``b`` after ``a`` as a sum over pairs of taps of channel-matrix products.

    ``C[o, i, ta*dA + tb*dB*sA] += B[o, c, tb] @ A[c, i, ta]``, in float64, grouped by
    ``g = gcd(gA, gB)``: ``Co * C1/gB * Ci/gA * KA * KB`` multiply-adds, all of them by BLAS
    (no zero-padded convolution, no dilated zero taps). Within a group of ``g`` the middle
    channels split into ``ra * rb`` fine blocks (``ra = gA/g``, ``rb = gB/g``), each inside one
    group of ``a`` and one of ``b``; block ``f`` maps the inputs of ``a``'s group ``f // rb`` to
    the outputs of ``b``'s group ``f // ra``. One batched matrix product gives every block's
    ``[Co/gB * KB, Ci/gA * KA]`` products; they are then added into ``C`` one tap of the smaller
    kernel at a time (a strided window per tap). With one fine block and a pointwise side (conv
    then 1x1, 1x1 then conv, BN-free chains of equal groups) the product is laid out as ``C``
    already. Returns ``C[Co, Ci/g, *size]``.
    """
    ra, rb = a.groups // g, b.groups // g
    fine = ra * rb
    ka, kb = a.kernel_size, b.kernel_size
    pa, pb = math.prod(ka), math.prod(kb)
    cf = a.out_channels // (g * fine)  # middle channels per fine block
    co_b = b.out_channels // b.groups  # outputs per group of b
    ci_a = a.in_channels // a.groups  # inputs per group of a
    step_a = a.dilation
    step_b = tuple(d * s for d, s in zip(b.dilation, a.stride))
    if fine == 1 and (pa == 1 or pb == 1):  # a pointwise side: one matrix product, no tap loop
        wa1 = _f64(a.weight).reshape(g, cf, ci_a, pa)
        wb1 = _f64(b.weight).reshape(g, co_b, cf, pb)
        if pb == 1:  # C[o, i, ta] = B[o, :] @ A[:, i, ta]
            taps = np.matmul(wb1[..., 0], wa1.reshape(g, cf, ci_a * pa)).reshape(g, co_b, ci_a, *ka)
            step = step_a
        else:  # C[o, i, tb] = A[:, i]^T @ B[o, :, tb], batched over o: the result is in place
            taps = np.matmul(wa1[..., 0].transpose(0, 2, 1)[:, None], wb1).reshape(g, co_b, ci_a, *kb)
            step = step_b
        if all(x == 1 for x in step):
            return taps.reshape(b.out_channels, ci_a, *size)
        out = np.zeros((g, co_b, ci_a, *size))
        out[(slice(None),) * 3 + tuple(slice(None, None, x) for x in step)] = taps
        return out.reshape(b.out_channels, ci_a, *size)
    wa = _f64(a.weight).reshape(g, fine, cf, ci_a * pa)  # rows of fine block f of coarse group q
    wb = _f64(b.weight).reshape(g, rb, co_b, ra, cf, pb)
    # B's block for f: [g, co_b, cf, KB] -> [g, co_b * KB, cf]; batched over (f, g).
    f_idx = np.arange(fine)
    b_blocks = wb[:, f_idx // ra, :, f_idx % ra]  # [fine, g, co_b, cf, KB]
    b_blocks = b_blocks.transpose(0, 1, 2, 4, 3).reshape(fine, g, co_b * pb, cf)
    prods = np.matmul(b_blocks, wa.swapaxes(0, 1))  # [fine, g, co_b*KB, ci_a*KA]
    prods = prods.reshape(fine, g, co_b, pb, ci_a, pa)
    # Into [g, rb, co_b, ra, ci_a, KB, KA]: fine block f sits at (f // ra, f // rb).
    if ra == 1:  # every block reads the group's one input block
        q = prods.transpose(1, 0, 2, 4, 3, 5)[:, :, :, None]
    elif rb == 1:  # every block writes the group's one output block
        q = prods.transpose(1, 2, 0, 4, 3, 5)[:, None]
    else:
        q = np.zeros((g, rb, co_b, ra, ci_a, pb, pa))
        for f in range(fine):
            q[:, f // ra, :, f // rb] += prods[f].transpose(0, 1, 3, 2, 4)
    q = q.reshape(g, rb * co_b, ra * ci_a, *kb, *ka)
    out = np.zeros((g, rb * co_b, ra * ci_a, *size))
    lead = (slice(None),) * 3
    if pb <= pa:  # one strided window of A's taps per tap of B
        for tb in np.ndindex(*kb):
            window = tuple(
                slice(t * sb, t * sb + sa * (k - 1) + 1, sa) for t, sb, sa, k in zip(tb, step_b, step_a, ka)
            )
            out[lead + window] += q[lead + tb]
    else:  # one strided window of B's taps per tap of A
        for ta in np.ndindex(*ka):
            window = tuple(
                slice(t * sa, t * sa + sb * (k - 1) + 1, sb) for t, sa, sb, k in zip(ta, step_a, step_b, kb)
            )
            out[lead + window] += q[lead + (Ellipsis,) + ta]
    return out.reshape(b.out_channels, ra * ci_a, *size)


def _check_b_padding(a: ConvSpec, b: ConvSpec, padded_dims: list[int]) -> Decline | None:
    """Whether B's padding of A's output equals a padding of A's input (DESIGN.md section 2).

    Zero padding: A must send zero to zero on the border (kernel 1 and zero padding there, zero
    bias: case 1); a biased pointwise A is case 2, a spatial A case 3. Reflect, replicate and
    circular padding commute with any pointwise, stride-1, unpadded A (bias included), since
    they only copy positions; anything else is declined.
    """
    spatial = [i for i in padded_dims if a.kernel_size[i] != 1]
    if b.padding_mode != "zeros":
        if spatial or any(a.stride[i] != 1 or a.pads[i] != (0, 0) for i in padded_dims):
            return Decline(
                Reason.PADDING_MODE,
                f"second conv pads in {b.padding_mode!r} mode after a conv with kernel {a.kernel_size}, "
                f"stride {a.stride}: its border copies the first conv's output, which no single conv "
                "reproduces (exact only after a pointwise, stride-1, unpadded conv)",
            )
        if a.is_padded and a.padding_mode != b.padding_mode:
            return Decline(
                Reason.MIXED_PADDING_MODES,
                f"merged conv would need {a.padding_mode!r} and {b.padding_mode!r} padding at once",
            )
        return None
    if spatial or (a.padding_mode != "zeros" and any(a.pads[i] != (0, 0) for i in padded_dims)):
        return Decline(
            Reason.PADDED_AFTER_SPATIAL,
            f"second conv pads {b.pads} after a first conv with kernel {a.kernel_size}: the border "
            "of the first conv's output depends on the input, so zero-padding it is not one conv "
            "(case 3)",
        )
    if a.has_nonzero_bias():
        return Decline(
            Reason.PADDED_AFTER_BIASED_POINTWISE,
            "second conv zero-pads the output of a pointwise conv with non-zero bias: the merged "
            "conv would see the bias on the border instead of zeros (case 2; exact only with a "
            "constant correction map)",
        )
    if a.padding_mode != "zeros" and a.is_padded:
        return Decline(
            Reason.MIXED_PADDING_MODES,
            f"merged conv would need {a.padding_mode!r} padding in some dims and zeros in others",
        )
    return None


def _is_channel_scale(spec: ConvSpec) -> bool:
    """A per-channel affine written as a conv: depthwise, kernel 1, stride 1, unpadded."""
    return (
        spec.groups == spec.out_channels == spec.in_channels
        and spec.is_pointwise
        and not spec.is_padded
        and all(s == 1 for s in spec.stride)
    )


def _scale_of(spec: ConvSpec) -> ChannelAffine:
    return ChannelAffine(spec.weight.reshape(-1), spec.bias_or_zeros())


def _scale_inputs(affine: ChannelAffine, spec: ConvSpec) -> ConvSpec:
    """``spec`` after ``x -> scale*x + shift`` (the shortcut of :func:`compose` for BN then conv):
    ``W'[o, c] = W[o, c] * scale[c]``, ``b'[o] = b[o] + sum_{c,j} W[o, c, j] * shift[c]``."""
    w = _f64(spec.weight)
    cig = w.shape[1]
    co_g = spec.out_channels // spec.groups
    scale = np.broadcast_to(
        _f64(affine.scale).reshape(spec.groups, 1, cig), (spec.groups, co_g, cig)
    ).reshape(-1, cig)
    shift = np.broadcast_to(
        _f64(affine.shift).reshape(spec.groups, 1, cig), (spec.groups, co_g, cig)
    ).reshape(-1, cig)
    spatial = tuple(range(2, w.ndim))
    weight = w * scale.reshape(*scale.shape, *([1] * len(spatial)))
    bias = _f64(spec.bias_or_zeros()) + (w.sum(axis=spatial) * shift).sum(axis=1)
    return spec.replace(weight=weight, bias=bias)


def compose_chain(specs: Sequence[ConvSpec]) -> ConvSpec | Decline:
    """Fold a chain ``specs[0] -> specs[1] -> ...`` left to right; the first decline stops it."""
    merged = specs[0]
    for nxt in specs[1:]:
        result = compose(merged, nxt)
        if isinstance(result, Decline):
            return result
        merged = result
    return merged


# --------------------------------------------------------------------------- rule: affine
def then_affine(spec: ConvSpec, affine: ChannelAffine) -> ConvSpec | Decline:
    """Conv then per-channel affine (inference BN, Mul/Add by constants).

    Pattern: ``x -> conv -> scale*y + shift``. Condition: one scale per output channel.
    Algebra: ``W'[o] = W[o] * scale[o]``, ``b'[o] = b[o] * scale[o] + shift[o]``.
    """
    if affine.channels != spec.out_channels:
        return Decline(
            Reason.CHANNEL_MISMATCH,
            f"per-channel constant has {affine.channels} channels, conv has {spec.out_channels}",
        )
    scale, shift = _f64(affine.scale).reshape(-1), _f64(affine.shift).reshape(-1)
    w = _f64(spec.weight) * scale.reshape(-1, *([1] * (spec.weight.ndim - 1)))
    b = _f64(spec.bias_or_zeros()) * scale + shift
    return spec.replace(weight=w.astype(spec.dtype, copy=False), bias=b.astype(spec.dtype, copy=False))


def affine_conv(affine: ChannelAffine, ndim: int) -> ConvSpec:
    """A per-channel affine as a depthwise pointwise conv (BN alone, BN before a conv)."""
    c = affine.channels
    weight = affine.scale.reshape(c, 1, *([1] * ndim))  # a view: the spec is never written to
    return ConvSpec(weight=weight, bias=affine.shift.reshape(c), groups=c)


def identity(channels: int, ndim: int, dtype: Any = np.float32) -> ConvSpec:
    """The identity map as a Dirac kernel: depthwise, kernel 1, weight 1."""
    return ConvSpec(weight=np.ones((channels, 1, *([1] * ndim)), dtype=as_dtype(dtype)), groups=channels)


def average_pool(
    channels: int,
    kernel: Sequence[int],
    stride: Sequence[int] | None = None,
    pads: Sequence[tuple[int, int]] | None = None,
    dtype: Any = np.float32,
) -> ConvSpec:
    """Average pooling whose zero padding counts in the divisor: a uniform depthwise kernel.

    Only valid when padding is zero or ``count_include_pad`` is on, and without ``ceil_mode``;
    the front ends check those attributes before calling this.
    """
    n = len(kernel)
    weight = np.full((channels, 1, *kernel), 1.0 / math.prod(kernel), dtype=as_dtype(dtype))
    return ConvSpec(
        weight=weight,
        stride=tuple(stride) if stride is not None else tuple(kernel),
        pads=tuple(pads) if pads is not None else ((0, 0),) * n,
        groups=channels,
    )


# --------------------------------------------------------------------------- rule: A + B
@dataclass(frozen=True)
class _Window:
    """The union read window of parallel convs, per spatial dim."""

    begin: tuple[int, ...]  # largest begin padding
    end: tuple[int, ...]  # largest end padding
    size: tuple[int, ...]  # dense taps covering every branch's reads
    mode: str


def _union_window(specs: Sequence[ConvSpec], what: str) -> _Window | Decline:
    first = specs[0]
    for s in specs[1:]:
        if s.ndim != first.ndim:
            return Decline(Reason.RANK_MISMATCH, f"{what} branches are {first.ndim}D and {s.ndim}D")
        if s.in_channels != first.in_channels:
            return Decline(
                Reason.CHANNEL_MISMATCH,
                f"{what} branches read {first.in_channels} and {s.in_channels} input channels",
            )
        if s.stride != first.stride:
            return Decline(
                Reason.STRIDE_MISMATCH, f"{what} branches have strides {first.stride} and {s.stride}"
            )
    # Output size is floor((n + slack) / s) + 1 with slack = begin + end - extent; equal for all n
    # exactly when slack is equal.
    slack = {tuple(b + e - x for (b, e), x in zip(s.pads, s.extent)) for s in specs}
    if len(slack) != 1:
        return Decline(
            Reason.GRID_MISMATCH,
            f"{what} branches produce different output grids (pads {[s.pads for s in specs]}, "
            f"extents {[s.extent for s in specs]})",
        )
    modes = {s.padding_mode for s in specs if s.is_padded}
    if len(modes) > 1:
        return Decline(Reason.MIXED_PADDING_MODES, f"{what} branches pad in modes {sorted(modes)}")
    (sl,) = slack
    begin = tuple(max(s.pads[i][0] for s in specs) for i in range(first.ndim))
    end = tuple(max(s.pads[i][1] for s in specs) for i in range(first.ndim))
    size = tuple(b + e - x for b, e, x in zip(begin, end, sl))
    return _Window(begin, end, size, modes.pop() if modes else "zeros")


def _embed(out: np.ndarray, spec: ConvSpec, window: _Window, groups: int) -> None:
    """Add ``spec``'s weight, ``groups``-grouped, into ``out`` (float64, dense taps of the union
    window): tap ``j`` reads offset ``-b + j*d``, a strided window of ``out`` (no dilated copy)."""
    w = _ungroup(spec.weight, spec.groups, groups)
    index = [slice(None), slice(None)]
    for i, ((b, _), d) in enumerate(zip(spec.pads, spec.dilation)):
        start = window.begin[i] - b  # offset -b in a window starting at -begin
        index.append(slice(start, start + d * (w.shape[i + 2] - 1) + 1, d))
    out[tuple(index)] += w


def add(specs: Sequence[ConvSpec]) -> ConvSpec | Decline:
    """Parallel sum: one conv ``C`` with ``C(x) == sum_i specs[i](x)``.

    Pattern: branches of one input combined by Add/Sum (RepVGG, ACNet, DBB, MobileOne).
    Conditions: equal ranks, input and output channels and strides; equal output grids for every
    input size (``begin + end - extent`` equal per dim); padded branches share one padding mode.
    Algebra: branch ``i`` reads ``x[p*s - begin_i + j*d_i]``; embed each kernel densely in the
    union window starting at ``-max(begin)``, sum weights and biases.
    """
    window = _union_window(specs, "summed")
    if isinstance(window, Decline):
        return window
    if len({s.out_channels for s in specs}) != 1:
        return Decline(
            Reason.CHANNEL_MISMATCH,
            f"summed branches have {[s.out_channels for s in specs]} output channels",
        )
    g = reduce(math.gcd, [s.groups for s in specs])
    too_big = _too_large(
        specs[0].out_channels * specs[0].in_channels // g * math.prod(window.size), "the sum"
    )
    if too_big:
        return too_big
    weight = np.zeros((specs[0].out_channels, specs[0].in_channels // g, *window.size))
    for s in specs:
        _embed(weight, s, window, g)
    bias = None
    if any(s.bias is not None for s in specs):
        bias = np.sum([_f64(s.bias_or_zeros()) for s in specs], axis=0)
    merged = ConvSpec(
        weight=weight,
        bias=bias,
        stride=specs[0].stride,
        groups=g,
        pads=tuple(zip(window.begin, window.end)),
        padding_mode=window.mode,
    )
    return simplify(merged).to(specs[0].dtype)


def concat(specs: Sequence[ConvSpec]) -> ConvSpec | Decline:
    """Parallel convs of one input concatenated on channels: their weights stacked on ``Co``.

    Same conditions as :func:`add` except output channels may differ; each branch is embedded
    in the union window and the blocks are stacked.
    """
    window = _union_window(specs, "concatenated")
    if isinstance(window, Decline):
        return window
    co = sum(s.out_channels for s in specs)
    too_big = _too_large(co * specs[0].in_channels * math.prod(window.size), "the concatenation")
    if too_big:
        return too_big
    weight = np.zeros((co, specs[0].in_channels, *window.size))
    row = 0
    for s in specs:
        _embed(weight[row : row + s.out_channels], s, window, 1)
        row += s.out_channels
    bias = None
    if any(s.bias is not None for s in specs):
        bias = np.concatenate([_f64(s.bias_or_zeros()) for s in specs])
    merged = ConvSpec(
        weight=weight,
        bias=bias,
        stride=specs[0].stride,
        pads=tuple(zip(window.begin, window.end)),
        padding_mode=window.mode,
    )
    return simplify(merged).to(specs[0].dtype)
