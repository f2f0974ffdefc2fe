"""Case 2 merged exactly with a border correction (issue 14): property tests against torch, the
run-time ring against the static one, the cost, and the declined twins (case 3, padding modes)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convfuse.algebra import compose
from convfuse.border import (
    BorderMerge,
    border_ring,
    compose_across_border,
    correction_cost,
    ring_conv,
    ring_factors,
    ring_from_ones,
    ring_terms,
    ring_widths,
)
from convfuse.decline import Decline, Reason
from convfuse.spec import ConvSpec
from tests.support.border_cases import case2_pair, input_sizes, merge_error, min_input, oracle_ring
from tests.support.helpers import rel_err
from tests.support.strategies import rand

TOL = 1e-9  # float64, relative to the output's scale

_extras = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=3)


def _merge(a: ConvSpec, b: ConvSpec) -> BorderMerge:
    merge = compose_across_border(a, b)
    assert isinstance(merge, BorderMerge), f"expected a merge, got {merge}"
    return merge


def _on_ring_mask(merge: BorderMerge, spatial: tuple[int, ...]) -> np.ndarray:
    """True on the output positions that :func:`ring_widths` puts on the ring."""
    out = merge.out_size(spatial)
    mask = np.zeros(out, bool)
    for dim, (begin, end) in enumerate(ring_widths(merge, spatial)):
        index = [slice(None)] * len(out)
        index[dim] = np.r_[0:begin, out[dim] - end : out[dim]].astype(int)
        mask[tuple(index)] = True
    return mask


# ----------------------------------------------------------------------------- exact
@settings(max_examples=400)
@given(pair=case2_pair(), extras=_extras)
def test_case2_is_one_conv_plus_ring(pair: tuple[ConvSpec, ConvSpec], extras: list[tuple[int, ...]]) -> None:
    """B(pad0(A x + bA)) == C'(x) + ring at every size, tiny ones (all ring) included, and every
    form of the ring (static, edge/corner terms, ones-map conv in numpy and in torch) agrees."""
    a, b = pair
    merge = _merge(a, b)
    assert merge.spec.stride == tuple(x * y for x, y in zip(a.stride, b.stride))
    for spatial in [min_input(a, b), *input_sizes(a, b, extras)]:
        assert merge_error(a, b, merge, spatial, seed=sum(spatial)) <= TOL, (a, b, spatial)
        ring = border_ring(merge, spatial)
        scale = max(float(np.abs(ring).max()), float(np.abs(merge.interior).max()), 1e-300)
        assert not np.any(ring[:, ~_on_ring_mask(merge, spatial)])  # exactly zero in the interior
        assert np.abs(oracle_ring(a, b, merge, spatial).numpy() - ring).max() <= TOL * scale
        assert np.abs(ring_from_ones(merge, spatial) - ring).max() <= TOL * scale
        assert np.abs(ring_from_ones(merge, spatial, on_input_grid=True) - ring).max() <= TOL * scale
        ones = torch.ones(1, 1, *spatial, dtype=torch.float64)
        conv = ring_conv(merge, on_input_grid=True)
        assert isinstance(conv, ConvSpec)
        assert np.abs(conv.apply(ones)[0].numpy() - ring).max() <= TOL * scale


@settings(max_examples=60)
@given(pair=case2_pair())
def test_ring_widths_are_the_rows_where_a_tap_falls_out(pair: tuple[ConvSpec, ConvSpec]) -> None:
    """ceil(pB_begin/sB) first and ceil(pB_end'/sB) last positions per dim: exactly the rows of
    I_d that are not all ones; the terms vanish off the ring and sum to it."""
    a, b = pair
    merge = _merge(a, b)
    for spatial in input_sizes(a, b, [(0,), (1,), (4,), (7,)]):
        out = merge.out_size(spatial)
        for dim, (factor, (begin, end)) in enumerate(
            zip(ring_factors(merge, spatial), ring_widths(merge, spatial))
        ):
            falls_out = set(np.flatnonzero(factor.min(axis=1) < 1))
            assert falls_out == set(range(begin)) | set(range(out[dim] - end, out[dim])), (dim, spatial)
        terms = ring_terms(merge, spatial)
        assert len(terms) == 2**a.ndim - 1
        np.testing.assert_array_equal(
            sum(np.broadcast_to(t, (b.out_channels, *out)) for t in terms.values()),
            border_ring(merge, spatial),
        )


@pytest.mark.parametrize(
    "a_stride,b_kernel,b_stride,b_dilation,b_pads,b_groups",
    [
        ((1, 1), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1),
        ((2, 3), (3, 2), (2, 1), (2, 3), ((2, 0), (1, 3)), 2),
        ((3, 1), (5, 4), (3, 2), (1, 2), ((3, 2), (0, 1)), 6),
    ],
)
def test_runtime_ring_equals_static_ring_for_every_size(
    a_stride, b_kernel, b_stride, b_dilation, b_pads, b_groups
) -> None:
    """The ones-map ring equals the static ring at every input size from the smallest up."""
    a = ConvSpec(rand(6, 3, 1, 1, seed=1), rand(6, seed=2), stride=a_stride)
    b = ConvSpec(
        rand(6, 6 // b_groups, *b_kernel, seed=3), rand(6, seed=4), b_stride, b_dilation, b_groups, b_pads
    )
    merge = _merge(a, b)
    low = min_input(a, b)
    for h in range(low[0], low[0] + 12):
        for w in range(low[1], low[1] + 12):
            ring = border_ring(merge, (h, w))
            for grid in (False, True):
                np.testing.assert_allclose(ring_from_ones(merge, (h, w), grid), ring, rtol=0, atol=1e-12)
    assert merge_error(a, b, merge, low, seed=1) <= TOL


def test_expansion_block_with_default_biases() -> None:
    """1x1 (bias) -> 3x3 pad 1 -> 1x1: one 3x3 conv plus a ring one position wide, whose
    corner terms live on the four corners only."""
    c = 4
    a = ConvSpec(rand(4 * c, c, 1, 1, seed=1).float(), rand(4 * c, seed=2).float())
    b = ConvSpec(rand(4 * c, 4 * c, 3, 3, seed=3).float(), rand(4 * c, seed=4).float(), pads=((1, 1), (1, 1)))
    p = ConvSpec(rand(c, 4 * c, 1, 1, seed=5).float(), rand(c, seed=6).float())
    declined = compose(a, b)
    assert isinstance(declined, Decline) and declined.reason is Reason.PADDED_AFTER_BIASED_POINTWISE
    merge = _merge(a, b)
    merged = compose(merge.spec, p)  # the 1x1 after: the ring goes through it as a 1x1 too
    assert isinstance(merged, ConvSpec) and merged.weight.shape == (c, c, 3, 3)
    assert merged.dtype == np.float32
    x = rand(2, c, 8, 8, seed=7)
    ring = torch.from_numpy(border_ring(merge, (8, 8)))
    ring_after = torch.einsum("oc,chw->ohw", torch.from_numpy(p.weight).double()[:, :, 0, 0], ring)
    ref = p.apply(b.apply(a.apply(x)))
    assert rel_err(ref, merged.apply(x) + ring_after) <= 1e-6  # float32 weights, float64 oracle
    assert ring_widths(merge, (8, 8)) == ((1, 1), (1, 1))
    corner = ring_terms(merge, (8, 8))[(0, 1)]
    assert set(zip(*np.nonzero(np.abs(corner).sum(axis=0)))) == {(0, 0), (0, 7), (7, 0), (7, 7)}
    cost = correction_cost(merge, (8, 8))
    assert cost.needed and cost.out_spatial == (8, 8)
    assert cost.ring_positions == 64 - 36
    assert cost.ring_elements == cost.add_elements == 16 * 64 and cost.ring_bytes == 16 * 64 * 4
    assert cost.runtime_macs == 16 * 9 * 64 and cost.compact_elements == 16 * 9 + 8 * 3 * 2


def test_no_correction_when_b_does_not_pad_or_a_has_no_bias() -> None:
    """Twins with nothing to add: the ring is zero and costs nothing."""
    a = ConvSpec(rand(6, 3, 1, 1, seed=1), rand(6, seed=2))
    b = ConvSpec(rand(5, 6, 3, 3, seed=3), pads=((1, 1), (1, 1)))
    for left, right in [(a, b.replace(pads=((0, 0), (0, 0)))), (a.replace(bias=None), b)]:
        merge = _merge(left, right)
        cost = correction_cost(merge, (7, 7))
        assert not cost.needed and cost.ring_bytes == cost.add_elements == cost.runtime_macs == 0
        assert merge_error(left, right, merge, (7, 7), seed=1) <= TOL
    assert correction_cost(_merge(a, b), (7, 7)).needed


def test_pointwise_only_where_b_pads_and_a_padded_pointwise() -> None:
    """A 3x1 A under a B padded along W only, and a zero-padded 1x1 A: still exact."""
    a = ConvSpec(rand(6, 4, 3, 1, seed=1), rand(6, seed=2), pads=((1, 1), (0, 0)))
    b = ConvSpec(rand(5, 6, 1, 3, seed=3), pads=((0, 0), (2, 1)), stride=(1, 2))
    merge = _merge(a, b)
    assert merge_error(a, b, merge, (6, 9), seed=1) <= TOL
    assert isinstance(ring_conv(merge, on_input_grid=True), Decline)
    assert np.abs(ring_from_ones(merge, (6, 9)) - border_ring(merge, (6, 9))).max() <= 1e-12
    padded = ConvSpec(rand(6, 4, 1, 1, seed=4), rand(6, seed=5), stride=(2, 1), pads=((1, 0), (2, 2)))
    merge = _merge(padded, b.replace(pads=((1, 2), (2, 1))))
    assert merge_error(padded, merge.second, merge, (5, 4), seed=2) <= TOL
    with pytest.raises(ValueError):
        ring_from_ones(merge, (5, 4), on_input_grid=True)


# ----------------------------------------------------------------------------- declines
def _naive(a: ConvSpec, b: ConvSpec, spatial: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """What a careless tool would emit: merge as if B were unpadded, pad by ``pB * sA`` and add
    the case-2 ring ``Bnb(pad0(bA * 1)) - Kint`` as if A were pointwise."""
    merged = compose(a, b.replace(pads=((0, 0),) * b.ndim))
    assert isinstance(merged, ConvSpec)
    pads = tuple((m0 + s * p0, m1 + s * p1) for (m0, m1), (p0, p1), s in zip(merged.pads, b.pads, a.stride))
    merged = merged.replace(pads=pads, padding_mode="zeros")
    zero_padded = b.replace(padding_mode="zeros")
    ones = torch.ones(1, a.out_channels, *a.output_size(spatial), dtype=torch.float64)
    k = zero_padded.replace(bias=None).apply(ones * torch.from_numpy(a.bias).reshape(1, -1, *([1] * a.ndim)))
    k_int = zero_padded.replace(bias=None, pads=((0, 0),) * b.ndim).apply(
        ones * torch.from_numpy(a.bias).reshape(1, -1, *([1] * a.ndim))
    )
    interior = k_int.flatten(2)[..., :1].reshape(1, -1, *([1] * a.ndim))
    return merged.apply(x) + (k - interior)


def test_case3_declines_and_the_naive_ring_is_wrong() -> None:
    a = ConvSpec(rand(8, 4, 3, 3, seed=1), rand(8, seed=2), pads=((1, 1), (1, 1)))
    b = ConvSpec(rand(8, 8, 3, 3, seed=3), pads=((1, 1), (1, 1)))
    result = compose_across_border(a, b)
    assert isinstance(result, Decline) and result.reason is Reason.PADDED_AFTER_SPATIAL
    x = rand(2, 4, 8, 8, seed=4)
    ref, naive = b.apply(a.apply(x)), _naive(a, b, (8, 8), x)
    assert rel_err(ref, naive) > 1e-3  # the border depends on x: no constant fixes it
    assert rel_err(ref[..., 1:-1, 1:-1], naive[..., 1:-1, 1:-1]) <= TOL  # wrong on the border only
    # Twin: the same shapes with a pointwise A merge exactly.
    pointwise = ConvSpec(rand(8, 4, 1, 1, seed=1), rand(8, seed=2))
    assert merge_error(pointwise, b, _merge(pointwise, b), (8, 8), seed=4) <= TOL


@pytest.mark.parametrize("mode,size", [("reflect", 8), ("replicate", 8), ("circular", 7)])
def test_padding_mode_declines_and_the_naive_ring_is_wrong(mode: str, size: int) -> None:
    """Copy padding after a strided pointwise A: declined; zero-padding ring or none, both wrong."""
    a = ConvSpec(rand(4, 4, 1, 1, seed=1), rand(4, seed=2), stride=(2, 2))
    b = ConvSpec(rand(4, 4, 3, 3, seed=3), pads=((1, 1), (1, 1)), padding_mode=mode)
    result = compose_across_border(a, b)
    assert isinstance(result, Decline) and result.reason is Reason.PADDING_MODE
    x = rand(1, 4, size, size, seed=3)
    ref = b.apply(a.apply(x))
    assert rel_err(ref, _naive(a, b, (size, size), x)) > 1e-3
    zero_twin = _merge(a, b.replace(padding_mode="zeros"))  # the zeros-mode merge and its ring
    copy_mode = zero_twin.spec.replace(padding_mode=mode)  # a copied constant needs no ring...
    assert rel_err(ref, copy_mode.apply(x)) > 1e-3  # ...but B copies A's rows, not x's


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_after_stride1_pointwise_needs_no_ring(mode: str) -> None:
    """Twin: stride-1 pointwise A, copy-padded B: exact with a zero ring (the constant is copied)."""
    a = ConvSpec(rand(4, 3, 1, 1, seed=1), rand(4, seed=2))
    b = ConvSpec(rand(5, 4, 3, 2, seed=3), rand(5, seed=4), pads=((1, 2), (1, 0)), padding_mode=mode)
    merge = _merge(a, b)
    assert not np.any(border_ring(merge, (7, 6))) and not correction_cost(merge, (7, 6)).needed
    assert merge_error(a, b, merge, (7, 6), seed=5) <= TOL
    assert np.abs(ring_from_ones(merge, (7, 6))).max() <= 1e-12


def test_other_declines_pass_through() -> None:
    a = ConvSpec(rand(6, 3, 1, 1, seed=1), rand(6, seed=2))
    result = compose_across_border(a, ConvSpec(rand(5, 4, 3, 3, seed=3), pads=((1, 1), (1, 1))))
    assert isinstance(result, Decline) and result.reason is Reason.CHANNEL_MISMATCH


def test_precision_script_reports_float64_rounding(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import border_precision

    border_precision.main(4)
    out = capsys.readouterr().out
    errors = [float(e) for e in re.findall(r"(\d\.\d\de[-+]\d\d)$", out, flags=re.M)]
    assert len(errors) == 4 and max(errors) < 1e-12, out
