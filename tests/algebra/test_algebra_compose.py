"""Sequential composition (A then B): property tests against torch, and the declined cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convfuse.algebra import compose, compose_chain
from convfuse.decline import Decline, Reason
from convfuse.spec import ConvSpec
from tests.support.helpers import rel_err
from tests.support.strategies import conv_chain, conv_pair, input_for, rand

TOL = 1e-9  # float64: merged output within 1e-9 of the output's scale


def _check_exact(a: ConvSpec, b: ConvSpec, extra: tuple[int, ...]) -> ConvSpec:
    merged = compose(a, b)
    assert isinstance(merged, ConvSpec), f"expected a merge, got {merged}"
    x = input_for([[a, b]], a.in_channels, extra, seed=3)
    ref = b.apply(a.apply(x))
    out = merged.apply(x)
    assert rel_err(ref, out) <= TOL, (a, b, merged)
    return merged


@settings(max_examples=1400)
@given(pair=conv_pair(), extra=st.tuples(st.integers(0, 5), st.integers(0, 3)))
def test_compose_unpadded_b_matches_two_convs(
    pair: tuple[ConvSpec, ConvSpec], extra: tuple[int, int]
) -> None:
    """Any A (strides, dilations, groups, asymmetric pads in any mode, bias) then an unpadded B."""
    a, b = pair
    merged = _check_exact(a, b, extra)
    assert merged.stride == tuple(x * y for x, y in zip(a.stride, b.stride))
    assert merged.groups % math.gcd(a.groups, b.groups) == 0  # never needlessly denser
    assert merged.dtype == a.dtype


@settings(max_examples=500)
@given(pair=conv_pair(b_padded=True, a_pointwise=True), extra=st.tuples(st.integers(0, 5), st.integers(0, 3)))
def test_compose_padded_b_after_pointwise_zero_bias(
    pair: tuple[ConvSpec, ConvSpec], extra: tuple[int, int]
) -> None:
    """DESIGN case 1: B pads after a pointwise, unpadded, zero-bias A (any stride): exact."""
    a, b = pair
    merged = _check_exact(a, b, extra)
    for (pb0, pb1), (pc0, pc1), s in zip(b.pads, merged.pads, a.stride):
        # Padding scales by A's stride, unless simplify trimmed zero taps into it.
        assert pc0 <= s * pb0 and pc1 <= s * pb1


@settings(max_examples=200)
@given(chain=conv_chain(), extra=st.tuples(st.integers(0, 3)))
def test_chains_fold_left(chain: list[ConvSpec], extra: tuple[int]) -> None:
    """Chains of 3-4 convs fold left into one conv computing the whole chain."""
    merged = compose_chain(chain)
    assert isinstance(merged, ConvSpec)
    x = input_for([chain], chain[0].in_channels, extra, seed=5)
    ref = x
    for s in chain:
        ref = s.apply(ref)
    assert rel_err(ref, merged.apply(x)) <= TOL


def test_three_conv_expandnet_chain() -> None:
    """1x1 expand -> 3x3 -> 1x1 project (ExpandNet) becomes one 3x3 with the outer channels."""
    a = ConvSpec(rand(16, 4, 1, 1, seed=1), rand(16, seed=2))
    b = ConvSpec(rand(16, 16, 3, 3, seed=3), rand(16, seed=4))
    c = ConvSpec(rand(4, 16, 1, 1, seed=5), rand(4, seed=6))
    merged = compose_chain([a, b, c])
    assert isinstance(merged, ConvSpec)
    assert merged.weight.shape == (4, 4, 3, 3)
    x = rand(2, 4, 9, 9, seed=7)
    assert rel_err(c.apply(b.apply(a.apply(x))), merged.apply(x)) <= TOL


# ----------------------------------------------------------------------------- structure
def test_depthwise_then_depthwise_stays_depthwise() -> None:
    a = ConvSpec(rand(6, 1, 3, 3, seed=1), groups=6)
    b = ConvSpec(rand(6, 1, 3, 3, seed=2), groups=6)
    merged = compose(a, b)
    assert isinstance(merged, ConvSpec)
    assert merged.groups == 6 and merged.weight.shape == (6, 1, 5, 5)


def test_mixed_groups_give_common_group_structure() -> None:
    a = ConvSpec(rand(8, 2, 3, seed=1), groups=4)  # 8 -> 8, 4 groups
    b = ConvSpec(rand(8, 4, 3, seed=2), groups=2)  # 8 -> 8, 2 groups
    merged = compose(a, b)
    assert isinstance(merged, ConvSpec)
    assert merged.groups == 2 and merged.weight.shape == (8, 4, 5)
    x = rand(2, 8, 11, seed=3)
    assert rel_err(b.apply(a.apply(x)), merged.apply(x)) <= TOL


def test_dense_groups_twin_stays_dense() -> None:
    """Negative twin: a dense B after a grouped A gives a dense result."""
    a = ConvSpec(rand(8, 2, 3, seed=1), groups=4)
    b = ConvSpec(rand(8, 8, 3, seed=2))
    merged = compose(a, b)
    assert isinstance(merged, ConvSpec) and merged.groups == 1


def test_pointwise_then_dilated_keeps_sparse_taps() -> None:
    """Taps spaced by a common factor come back as a dilated kernel, not a padded dense one."""
    a = ConvSpec(rand(8, 4, 1, 1, seed=1))
    b = ConvSpec(rand(8, 8, 3, 3, seed=2), dilation=(2, 2))
    merged = compose(a, b)
    assert isinstance(merged, ConvSpec)
    assert merged.kernel_size == (3, 3) and merged.dilation == (2, 2)
    # Negative twin: a strided pointwise A spreads B's taps by the stride, still sparse...
    a2 = ConvSpec(rand(8, 4, 1, 1, seed=1), stride=(2, 2))
    merged2 = compose(a2, ConvSpec(rand(8, 8, 3, 3, seed=2)))
    assert isinstance(merged2, ConvSpec) and merged2.dilation == (2, 2)
    # ...while a spatial A fills the gaps: dense kernel, dilation 1.
    a3 = ConvSpec(rand(8, 4, 3, 3, seed=1))
    merged3 = compose(a3, b)
    assert isinstance(merged3, ConvSpec) and merged3.dilation == (1, 1) and merged3.kernel_size == (7, 7)


def test_dtype_kept_and_arithmetic_in_float64() -> None:
    a = ConvSpec(rand(8, 4, 3, 3, seed=1).float(), rand(8, seed=2).float())
    b = ConvSpec(rand(4, 8, 3, 3, seed=3).float(), rand(4, seed=4).float())
    merged = compose(a, b)
    assert isinstance(merged, ConvSpec)
    assert merged.weight.dtype == np.float32 and merged.bias is not None and merged.bias.dtype == np.float32
    x = rand(1, 4, 12, 12, seed=5)
    ref = b.apply(a.apply(x))  # float64 oracle on float32 weights
    assert rel_err(ref, merged.apply(x)) <= 1e-6  # only the final cast to float32 rounds


# ----------------------------------------------------------------------------- declines
def _naive_padded_merge(a: ConvSpec, b: ConvSpec) -> ConvSpec:
    """What a careless tool would emit: merge as if B were unpadded, then pad by ``pB * sA``."""
    merged = compose(a, b.replace(pads=((0, 0),) * b.ndim))
    assert isinstance(merged, ConvSpec)
    return merged.replace(
        pads=tuple(
            (pa0 + s * pb0, pa1 + s * pb1) for (pa0, pa1), (pb0, pb1), s in zip(merged.pads, b.pads, a.stride)
        )
    )


def test_case2_biased_pointwise_then_padded_declines() -> None:
    a = ConvSpec(rand(8, 4, 1, 1, seed=1), rand(8, seed=2))
    b = ConvSpec(rand(8, 8, 3, 3, seed=3), pads=((1, 1), (1, 1)))
    result = compose(a, b)
    assert isinstance(result, Decline) and result.reason is Reason.PADDED_AFTER_BIASED_POINTWISE
    assert "case 2" in result.message
    x = rand(2, 4, 8, 8, seed=4)
    ref, naive = b.apply(a.apply(x)), _naive_padded_merge(a, b).apply(x)
    assert rel_err(ref, naive) > 1e-3  # the naive merge is wrong...
    assert rel_err(ref[..., 1:-1, 1:-1], naive[..., 1:-1, 1:-1]) <= TOL  # ...on the border only


def test_case2_twin_zero_bias_merges() -> None:
    a = ConvSpec(rand(8, 4, 1, 1, seed=1), torch.zeros(8, dtype=torch.float64))  # explicit zeros
    b = ConvSpec(rand(8, 8, 3, 3, seed=3), pads=((1, 1), (1, 1)))
    _check_exact(a, b, (2, 2))


def test_case3_spatial_then_padded_declines() -> None:
    a = ConvSpec(rand(8, 4, 3, 3, seed=1), pads=((1, 1), (1, 1)))
    b = ConvSpec(rand(8, 8, 3, 3, seed=3), pads=((1, 1), (1, 1)))
    result = compose(a, b)
    assert isinstance(result, Decline) and result.reason is Reason.PADDED_AFTER_SPATIAL
    assert "case 3" in result.message
    x = rand(2, 4, 8, 8, seed=4)
    ref, naive = b.apply(a.apply(x)), _naive_padded_merge(a, b).apply(x)
    assert rel_err(ref, naive) > 1e-3
    assert rel_err(ref[..., 1:-1, 1:-1], naive[..., 1:-1, 1:-1]) <= TOL


def test_case3_only_counts_dims_where_b_pads() -> None:
    """A 3x1 A and a 1x3 B padded only along W: A is pointwise along W, so it merges."""
    a = ConvSpec(rand(6, 4, 3, 1, seed=1), pads=((1, 1), (0, 0)))
    b = ConvSpec(rand(5, 6, 1, 3, seed=2), pads=((0, 0), (1, 1)))
    _check_exact(a, b, (1, 1))
    # Twin: the same B padded along H too, where A has extent 3: declined.
    result = compose(a, b.replace(weight=rand(5, 6, 3, 3, seed=2), pads=((1, 1), (1, 1))))
    assert isinstance(result, Decline) and result.reason is Reason.PADDED_AFTER_SPATIAL


@pytest.mark.parametrize("mode,size", [("reflect", 8), ("replicate", 8), ("circular", 7)])
def test_padding_mode_on_b_after_strided_pointwise_declines(mode: str, size: int) -> None:
    a = ConvSpec(rand(4, 4, 1, 1, seed=1), stride=(2, 2))
    b = ConvSpec(rand(4, 4, 3, 3, seed=2), pads=((1, 1), (1, 1)), padding_mode=mode)
    result = compose(a, b)
    assert isinstance(result, Decline) and result.reason is Reason.PADDING_MODE
    # The naive merge copies rows of x where B copies rows of A's subsampled output: wrong
    # whenever the copied row is off A's stride grid (even sizes for reflect/replicate, odd ones
    # for circular).
    naive = compose(a, b.replace(pads=((0, 0),) * 2))
    assert isinstance(naive, ConvSpec)
    naive = naive.replace(pads=((2, 2), (2, 2)), padding_mode=mode)
    x = rand(1, 4, size, size, seed=3)
    assert rel_err(b.apply(a.apply(x)), naive.apply(x)) > 1e-3


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_on_b_after_spatial_declines(mode: str) -> None:
    a = ConvSpec(rand(4, 4, 3, 3, seed=1))
    b = ConvSpec(rand(4, 4, 3, 3, seed=2), pads=((1, 1), (1, 1)), padding_mode=mode)
    result = compose(a, b)
    assert isinstance(result, Decline) and result.reason is Reason.PADDING_MODE


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_on_b_after_stride1_pointwise_merges(mode: str) -> None:
    """Twin: copying-style padding commutes with a pointwise stride-1 map, bias included."""
    a = ConvSpec(rand(6, 4, 1, 1, seed=1), rand(6, seed=5))
    b = ConvSpec(rand(5, 6, 3, 3, seed=2), rand(5, seed=6), pads=((1, 2), (2, 1)), padding_mode=mode)
    merged = _check_exact(a, b, (3, 2))
    assert merged.padding_mode == mode and merged.pads == b.pads
    # Mixed modes (A zero-pads, B reflects) cannot be one conv.
    a_padded = a.replace(pads=((0, 0), (0, 0)), weight=rand(6, 4, 1, 1, seed=1))
    assert isinstance(compose(a_padded, b), ConvSpec)
    a_zero_padded = ConvSpec(rand(6, 4, 1, 3, seed=1), pads=((0, 0), (0, 0)))
    b_h_only = b.replace(weight=rand(5, 6, 3, 1, seed=2), pads=((1, 1), (0, 0)))
    assert isinstance(compose(a_zero_padded, b_h_only), ConvSpec)
    a_w_padded = a_zero_padded.replace(pads=((0, 0), (1, 1)))
    result = compose(a_w_padded, b_h_only)
    assert isinstance(result, Decline) and result.reason is Reason.MIXED_PADDING_MODES


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_on_a_carries_over(mode: str) -> None:
    a = ConvSpec(rand(6, 4, 3, 3, seed=1), rand(6, seed=9), pads=((1, 2), (2, 1)), padding_mode=mode)
    b = ConvSpec(rand(5, 6, 3, 3, seed=2), rand(5, seed=8), stride=(2, 1))
    merged = _check_exact(a, b, (3, 4))
    assert merged.padding_mode == mode


def test_channel_and_rank_mismatch_decline() -> None:
    a = ConvSpec(rand(8, 4, 3, 3, seed=1))
    assert compose(a, ConvSpec(rand(4, 6, 3, 3, seed=2))).reason is Reason.CHANNEL_MISMATCH
    assert compose(a, ConvSpec(rand(4, 8, 3, seed=2))).reason is Reason.RANK_MISMATCH
    # Twin: matching channels merge.
    assert isinstance(compose(a, ConvSpec(rand(4, 8, 3, 3, seed=2))), ConvSpec)


def test_too_large_declines_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    import convfuse.algebra as algebra

    monkeypatch.setattr(algebra, "MAX_MERGED_ELEMENTS", 1000)
    a = ConvSpec(rand(16, 16, 3, 3, seed=1))
    b = ConvSpec(rand(16, 16, 3, 3, seed=2))
    result = compose(a, b)
    assert isinstance(result, Decline) and result.reason is Reason.TOO_LARGE
    monkeypatch.setattr(algebra, "MAX_MERGED_ELEMENTS", 16 * 16 * 25)
    assert isinstance(compose(a, b), ConvSpec)
