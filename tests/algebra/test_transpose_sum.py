"""Parallel sums of transposed convs (and stride-1 conv / identity branches) against torch."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convfuse.algebra import identity
from convfuse.decline import Decline, Reason
from convfuse.spec import ConvSpec
from convfuse.transpose import ConvTransposeSpec, add_transposed, conv_as_transpose
from tests.support.helpers import rel_err
from tests.support.transpose_cases import branches, min_input, np_rand, run_transpose

TOL = 1e-9


def _run(branch: ConvTransposeSpec | ConvSpec, x: torch.Tensor) -> torch.Tensor:
    return run_transpose(branch, x) if isinstance(branch, ConvTransposeSpec) else branch.apply(x)


def _check_sum(parts: list[ConvTransposeSpec | ConvSpec], extra: int) -> ConvTransposeSpec:
    merged = add_transposed(parts)
    assert isinstance(merged, ConvTransposeSpec), merged
    t = next(p for p in parts if isinstance(p, ConvTransposeSpec))
    sizes = [m + extra + 1 for m in min_input(t)]  # + 1: a conv branch needs one more position
    x = torch.from_numpy(np_rand(2, t.in_channels, *sizes, seed=9))
    ref = sum(_run(p, x) for p in parts)
    assert rel_err(ref, run_transpose(merged, x)) <= TOL
    return merged


@settings(max_examples=120)
@given(parts=branches(), extra=st.integers(0, 3))
def test_sum_of_aligned_transposed_convs(parts: list[ConvTransposeSpec | ConvSpec], extra: int) -> None:
    merged = _check_sum(parts, extra)
    assert merged.stride == parts[0].stride


@settings(max_examples=80)
@given(parts=branches(with_convs=True), extra=st.integers(0, 3))
def test_sum_with_conv_and_identity_branches(parts: list[ConvTransposeSpec | ConvSpec], extra: int) -> None:
    """Stride-1 transposed convs with 1x1, spatial (zero-padded) and identity conv branches."""
    _check_sum(parts, extra)


def test_upsampler_pair_embeds_in_the_larger_window() -> None:
    """k=4 p=1 and k=2 p=0 at stride 2 share a grid; the merged kernel is the k=4 window."""
    a = ConvTransposeSpec(
        np_rand(3, 2, 4, 4, seed=1), np_rand(2, seed=2), stride=(2, 2), pads=((1, 1), (1, 1))
    )
    b = ConvTransposeSpec(np_rand(3, 2, 2, 2, seed=3), stride=(2, 2))
    merged = _check_sum([a, b], 2)
    assert merged.kernel_size == (4, 4) and merged.pads == ((1, 1), (1, 1))


def test_identity_branch_of_a_stride_one_transpose() -> None:
    t = ConvTransposeSpec(np_rand(3, 3, 3, 3, seed=1), pads=((1, 1), (1, 1)))  # size-keeping
    merged = _check_sum([t, identity(3, 2, torch.float64)], 3)
    assert merged.kernel_size == (3, 3)
    as_t = conv_as_transpose(identity(3, 2, torch.float64))
    assert isinstance(as_t, ConvTransposeSpec) and as_t.kernel_size == (1, 1) and as_t.groups == 3


def test_strided_transpose_and_identity_decline() -> None:
    """An identity keeps n positions, a stride-2 transposed conv makes about 2n: never one grid."""
    t = ConvTransposeSpec(np_rand(3, 3, 4, seed=1), stride=(2,), pads=((1, 1),))
    result = add_transposed([t, identity(3, 1, torch.float64)])
    assert isinstance(result, Decline) and result.reason is Reason.STRIDE_MISMATCH
    x = torch.from_numpy(np_rand(1, 3, 5, seed=2))
    assert run_transpose(t, x).shape != x.shape  # there is no sum to fold
    strided = ConvSpec(torch.from_numpy(np_rand(3, 3, 1, seed=3)), stride=(2,))
    assert add_transposed([t.replace(stride=(1,)), strided]).reason is Reason.STRIDE_MISMATCH


def test_grid_mismatch_declines() -> None:
    """Equal stride, different slack: the outputs differ in size at every input size."""
    a = ConvTransposeSpec(np_rand(3, 2, 4, seed=1), stride=(2,), pads=((1, 1),))
    b = ConvTransposeSpec(np_rand(3, 2, 3, seed=2), stride=(2,), pads=((1, 1),))
    result = add_transposed([a, b])
    assert isinstance(result, Decline) and result.reason is Reason.GRID_MISMATCH
    for n in range(1, 6):
        assert a.output_size((n,)) != b.output_size((n,))
    # Twin: output_padding closes the gap (slack 1 + 1 = 2), so they share the grid and merge.
    _check_sum([a, b.replace(output_padding=(1,))], 2)


def test_unaligned_identity_declines() -> None:
    """A stride-1 transposed conv that grows its input (slack 2) does not align with identity."""
    t = ConvTransposeSpec(np_rand(3, 3, 3, seed=1))
    result = add_transposed([t, identity(3, 1, torch.float64)])
    assert isinstance(result, Decline) and result.reason is Reason.GRID_MISMATCH


def test_reflect_padded_conv_branch_declines() -> None:
    t = ConvTransposeSpec(np_rand(3, 3, 3, seed=1), pads=((1, 1),))
    conv = ConvSpec(torch.from_numpy(np_rand(3, 3, 3, seed=2)), pads=((1, 1),), padding_mode="reflect")
    result = add_transposed([t, conv])
    assert isinstance(result, Decline) and result.reason is Reason.PADDING_MODE
    naive = add_transposed([t, conv.replace(padding_mode="zeros")])  # reads zeros where it reflects
    assert isinstance(naive, ConvTransposeSpec)
    x = torch.from_numpy(np_rand(1, 3, 6, seed=3))
    assert rel_err(run_transpose(t, x) + conv.apply(x), run_transpose(naive, x)) > 1e-3


def test_channel_and_rank_mismatch_decline() -> None:
    a = ConvTransposeSpec(np_rand(3, 2, 3, seed=1))
    assert add_transposed([a, ConvTransposeSpec(np_rand(3, 3, 3, seed=2))]).reason is Reason.CHANNEL_MISMATCH
    assert add_transposed([a, ConvTransposeSpec(np_rand(2, 2, 3, seed=2))]).reason is Reason.CHANNEL_MISMATCH
    assert add_transposed([a, ConvTransposeSpec(np_rand(3, 2, 3, 3, seed=2))]).reason is Reason.RANK_MISMATCH


def test_dilated_sum_stays_dilated() -> None:
    """Two dilation-2 kernels on one grid: the merged taps are re-dilated, not a dense window."""
    a = ConvTransposeSpec(np_rand(2, 2, 3, seed=1), dilation=(2,), pads=((2, 2),))
    b = ConvTransposeSpec(np_rand(2, 2, 2, seed=2), dilation=(2,), pads=((0, 2),), output_padding=(0,))
    assert a.slack == b.slack
    merged = _check_sum([a, b], 2)
    assert merged.dilation == (2,) and merged.kernel_size == (3,)
