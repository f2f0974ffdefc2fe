"""Parallel sums and concatenations of convs of one input, identity and average pooling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convfuse.algebra import add, average_pool, concat, identity
from convfuse.decline import Decline, Reason
from convfuse.spec import ConvSpec
from tests.support.helpers import rel_err
from tests.support.strategies import input_for, parallel_branches, rand

TOL = 1e-9


@settings(max_examples=400)
@given(branches=parallel_branches(), extra=st.tuples(st.integers(0, 4), st.integers(0, 2)))
def test_sum_of_aligned_branches_matches(branches: list[ConvSpec], extra: tuple[int, int]) -> None:
    """Any aligned branches (kernels, dilations, asymmetric pads, groups, one padding mode)."""
    merged = add(branches)
    assert isinstance(merged, ConvSpec), merged
    x = input_for([[b] for b in branches], branches[0].in_channels, extra, seed=11)
    ref = sum(b.apply(x) for b in branches)
    assert rel_err(ref, merged.apply(x)) <= TOL


@settings(max_examples=150)
@given(branches=parallel_branches(), extra=st.tuples(st.integers(0, 4)))
def test_concat_of_aligned_branches_matches(branches: list[ConvSpec], extra: tuple[int]) -> None:
    merged = concat(branches)
    assert isinstance(merged, ConvSpec), merged
    x = input_for([[b] for b in branches], branches[0].in_channels, extra, seed=12)
    ref = torch.cat([b.apply(x) for b in branches], dim=1)
    assert rel_err(ref, merged.apply(x)) <= TOL


def _bn_conv(co: int, ci: int, k: tuple[int, ...], pads: tuple[tuple[int, int], ...], seed: int) -> ConvSpec:
    return ConvSpec(rand(co, ci, *k, seed=seed), rand(co, seed=seed + 1), pads=pads)


def test_repvgg_block_sum() -> None:
    """3x3 + 1x1 + identity: one 3x3 with the identity on the centre tap."""
    c = 6
    branches = [
        _bn_conv(c, c, (3, 3), ((1, 1), (1, 1)), 1),
        _bn_conv(c, c, (1, 1), ((0, 0), (0, 0)), 2),
        identity(c, 2, torch.float64),
    ]
    merged = add(branches)
    assert isinstance(merged, ConvSpec)
    assert merged.kernel_size == (3, 3) and merged.pads == ((1, 1), (1, 1)) and merged.groups == 1
    x = rand(2, c, 10, 9, seed=3)
    assert rel_err(x + branches[0].apply(x) + branches[1].apply(x), merged.apply(x)) <= TOL


def test_acnet_block_sum() -> None:
    """3x3 + 1x3 + 3x1 (ACNet): the asymmetric kernels land on the centre cross."""
    branches = [
        _bn_conv(4, 3, (3, 3), ((1, 1), (1, 1)), 1),
        _bn_conv(4, 3, (1, 3), ((0, 0), (1, 1)), 2),
        _bn_conv(4, 3, (3, 1), ((1, 1), (0, 0)), 3),
    ]
    merged = add(branches)
    assert isinstance(merged, ConvSpec) and merged.kernel_size == (3, 3)
    x = rand(2, 3, 7, 8, seed=4)
    assert rel_err(sum(b.apply(x) for b in branches), merged.apply(x)) <= TOL


def test_misaligned_branches_decline() -> None:
    """Negative twins: a 3x3 without padding and a 1x1 give different grids; strides differ."""
    a = _bn_conv(4, 3, (3, 3), ((0, 0), (0, 0)), 1)
    b = _bn_conv(4, 3, (1, 1), ((0, 0), (0, 0)), 2)
    result = add([a, b])
    assert isinstance(result, Decline) and result.reason is Reason.GRID_MISMATCH
    result = add([a.replace(pads=((1, 1), (1, 1))), b.replace(stride=(2, 2))])
    assert isinstance(result, Decline) and result.reason is Reason.STRIDE_MISMATCH
    result = add([a, _bn_conv(5, 3, (3, 3), ((0, 0), (0, 0)), 3)])
    assert isinstance(result, Decline) and result.reason is Reason.CHANNEL_MISMATCH


def test_shifted_but_same_size_branches_merge() -> None:
    """Same grid, different alignment: a 3x3 padded (0, 2) reads a shifted window; still exact."""
    a = _bn_conv(4, 3, (3, 3), ((0, 2), (1, 1)), 1)
    b = _bn_conv(4, 3, (3, 3), ((1, 1), (1, 1)), 2)
    merged = add([a, b])
    assert isinstance(merged, ConvSpec) and merged.kernel_size == (4, 3)
    x = rand(2, 3, 7, 8, seed=5)
    assert rel_err(a.apply(x) + b.apply(x), merged.apply(x)) <= TOL


def test_mixed_padding_modes_decline() -> None:
    a = ConvSpec(rand(4, 3, 3, 3, seed=1), pads=((1, 1), (1, 1)), padding_mode="reflect")
    b = ConvSpec(rand(4, 3, 3, 3, seed=2), pads=((1, 1), (1, 1)))
    result = add([a, b])
    assert isinstance(result, Decline) and result.reason is Reason.MIXED_PADDING_MODES
    # Twin: an unpadded branch reads no border, so it goes with any mode.
    merged = add([a, ConvSpec(rand(4, 3, 1, 1, seed=3))])
    assert isinstance(merged, ConvSpec) and merged.padding_mode == "reflect"
    x = rand(1, 3, 6, 6, seed=4)
    assert rel_err(a.apply(x) + ConvSpec(rand(4, 3, 1, 1, seed=3)).apply(x), merged.apply(x)) <= TOL


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_average_pool_counting_pads_is_a_depthwise_conv(ndim: int) -> None:
    pool_cls = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[ndim - 1]
    pool = pool_cls(3, stride=1, padding=1, count_include_pad=True)
    spec = average_pool(4, (3,) * ndim, (1,) * ndim, ((1, 1),) * ndim, torch.float64)
    x = rand(2, 4, *([6] * ndim), seed=1)
    assert rel_err(pool(x), spec.apply(x)) <= TOL
    # Negative twin: excluding the pads from the divisor is not a fixed kernel on the border.
    pool_excl = pool_cls(3, stride=1, padding=1, count_include_pad=False)
    assert rel_err(pool_excl(x), spec.apply(x)) > 1e-3


def test_dbb_branch_pool_sum() -> None:
    """conv3x3 + avgpool3x3 (as a depthwise conv) on a same-channel block merge into one conv."""
    c = 4
    conv = _bn_conv(c, c, (3, 3), ((1, 1), (1, 1)), 1)
    pool = average_pool(c, (3, 3), (1, 1), ((1, 1), (1, 1)), torch.float64)
    merged = add([conv, pool])
    assert isinstance(merged, ConvSpec) and merged.groups == 1
    x = rand(2, c, 8, 8, seed=2)
    ref = conv.apply(x) + nn.AvgPool2d(3, 1, 1, count_include_pad=True)(x)
    assert rel_err(ref, merged.apply(x)) <= TOL


def test_sum_of_depthwise_keeps_groups() -> None:
    branches = [ConvSpec(rand(6, 1, 3, 3, seed=i), pads=((1, 1), (1, 1)), groups=6) for i in range(2)]
    merged = add(branches + [identity(6, 2, torch.float64)])
    assert isinstance(merged, ConvSpec) and merged.groups == 6
    # Twin: a dense branch in the sum makes the result dense.
    merged = add(branches + [ConvSpec(rand(6, 6, 1, 1, seed=9))])
    assert isinstance(merged, ConvSpec) and merged.groups == 1
