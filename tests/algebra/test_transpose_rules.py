"""Rules for transposed convs against torch's conv_transpose in float64, and every declined case.

A decline's negative test shows the fold it refuses would be wrong: for a shift before a
transposed conv, that the shift's response is not one constant per channel (so *no* bias is
right), and that the naive conv-style bias ``bT + sum_j W * bA`` is wrong.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convfuse.algebra import ChannelAffine
from convfuse.decline import Decline, Reason
from convfuse.spec import ConvSpec
from convfuse.transpose import (
    ConvTransposeSpec,
    affine_then_transpose,
    pointwise_then_transpose,
    shift_response,
    transpose_then_affine,
    transpose_then_pointwise,
)
from tests.support.helpers import rel_err
from tests.support.transpose_cases import (
    input_for,
    min_input,
    np_rand,
    phase_balanced,
    pointwise,
    rim_cropped,
    run_transpose,
    transpose_spec,
)

TOL = 1e-9


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


def _sizes(spec: ConvTransposeSpec, count: int = 6) -> list[tuple[int, ...]]:
    """Input sizes from the smallest with an output up: all of them in 1D, a spread in 2D/3D."""
    lo = min_input(spec)
    if spec.ndim == 1:
        return [(lo[0] + i,) for i in range(3 * count)]
    grid = itertools.product(*[range(m, m + count) for m in lo])
    return [s for i, s in enumerate(grid) if i % 3 == 0][: 4 * count]


def _naive_bias(conv: ConvSpec, t: ConvTransposeSpec) -> np.ndarray:
    """The fold a careless tool would make: a conv-style bias, every tap on every output."""
    g = t.groups
    w = t.weight.reshape(g, t.in_channels // g, -1, *t.kernel_size).sum(axis=tuple(range(3, 3 + t.ndim)))
    c = np.asarray(conv.bias).reshape(g, -1)
    return t.bias_or_zeros() + np.einsum("gc,gco->go", c, w).reshape(-1)


def _response_varies(t: ConvTransposeSpec, shift: np.ndarray, sizes: list[tuple[int, ...]]) -> bool:
    """Whether T(shift) - T(0) differs between output positions of one channel for some size."""
    for size in sizes:
        x = _t(np.broadcast_to(shift.reshape(1, -1, *([1] * t.ndim)), (1, t.in_channels, *size)).copy())
        r = run_transpose(t.replace(bias=None), x)[0].reshape(t.out_channels, -1)
        if float((r.max(dim=1).values - r.min(dim=1).values).max()) > 1e-6 * (float(r.abs().max()) + 1e-30):
            return True
    return False


# ----------------------------------------------------------------------------- after T
@settings(max_examples=80)
@given(t=transpose_spec(), seed=st.integers(0, 2**20), extra=st.tuples(st.integers(0, 3)))
def test_transpose_then_affine(t: ConvTransposeSpec, seed: int, extra: tuple[int]) -> None:
    affine = ChannelAffine(
        torch.from_numpy(np_rand(t.out_channels, seed=seed)),
        torch.from_numpy(np_rand(t.out_channels, seed=seed + 1)),
    )
    merged = transpose_then_affine(t, affine)
    assert isinstance(merged, ConvTransposeSpec)
    x = input_for(t, extra, seed=3)
    view = (1, -1) + (1,) * t.ndim
    ref = run_transpose(t, x) * torch.from_numpy(affine.scale).view(view) + torch.from_numpy(
        affine.shift
    ).view(view)
    assert rel_err(ref, run_transpose(merged, x)) <= TOL
    bad = transpose_then_affine(
        t, ChannelAffine(torch.ones(t.out_channels + 1), torch.zeros(t.out_channels + 1))
    )
    assert isinstance(bad, Decline) and bad.reason is Reason.CHANNEL_MISMATCH


@settings(max_examples=100)
@given(data=st.data(), t=transpose_spec(), extra=st.tuples(st.integers(0, 3)))
def test_transpose_then_pointwise(data: st.DataObject, t: ConvTransposeSpec, extra: tuple[int]) -> None:
    """Any groups on either side: the result is grouped by their gcd."""
    b = data.draw(pointwise(t.out_channels, data.draw(st.integers(1, 4)) * t.groups, t.ndim))
    merged = transpose_then_pointwise(t, b)
    assert isinstance(merged, ConvTransposeSpec), merged
    assert merged.groups == np.gcd(t.groups, b.groups)
    x = input_for(t, extra, seed=4)
    assert rel_err(b.apply(run_transpose(t, x)), run_transpose(merged, x)) <= TOL


def test_depthwise_pointwise_after_is_a_scale() -> None:
    t = ConvTransposeSpec(
        np_rand(4, 3, 3, 3, seed=1), np_rand(6, seed=2), stride=(2, 2), groups=2, pads=((1, 0), (0, 1))
    )
    b = ConvSpec(torch.from_numpy(np_rand(6, 1, 1, 1, seed=3)), groups=6)
    merged = transpose_then_pointwise(t, b)
    assert isinstance(merged, ConvTransposeSpec) and merged.groups == 2
    x = input_for(t, (3,), seed=5)
    assert rel_err(b.apply(run_transpose(t, x)), run_transpose(merged, x)) <= TOL


def test_padded_pointwise_after_declines() -> None:
    """A zero-padded 1x1 after T sees zeros on its rim where the fold would see T's bias."""
    t = ConvTransposeSpec(np_rand(2, 3, 3, seed=1), np_rand(3, seed=2), stride=(2,), pads=((2, 2),))
    b = ConvSpec(
        torch.from_numpy(np_rand(4, 3, 1, seed=3)), torch.from_numpy(np_rand(4, seed=4)), pads=((1, 1),)
    )
    result = transpose_then_pointwise(t, b)
    assert isinstance(result, Decline) and result.reason is Reason.NOT_POINTWISE
    naive = transpose_then_pointwise(t.replace(pads=((1, 1),)), b.replace(pads=((0, 0),)))  # crop 1 less
    assert isinstance(naive, ConvTransposeSpec)
    x = input_for(t, (4,), seed=5)
    ref, out = b.apply(run_transpose(t, x)), run_transpose(naive, x)
    assert (
        rel_err(ref, out) > 1e-3 and rel_err(ref[..., 1:-1], out[..., 1:-1]) <= TOL
    )  # wrong on the rim only


def test_strided_or_spatial_conv_after_declines() -> None:
    t = ConvTransposeSpec(np_rand(2, 3, 4, seed=1), stride=(2,), pads=((1, 1),))
    strided = ConvSpec(torch.from_numpy(np_rand(4, 3, 1, seed=2)), stride=(2,))
    result = transpose_then_pointwise(t, strided)
    assert isinstance(result, Decline) and result.reason is Reason.NOT_POINTWISE
    # The fold that ignores B's stride keeps every position B drops: wrong size.
    naive = transpose_then_pointwise(t, strided.replace(stride=(1,)))
    x = input_for(t, (3,), seed=3)
    assert strided.apply(run_transpose(t, x)).shape != run_transpose(naive, x).shape
    spatial = ConvSpec(torch.from_numpy(np_rand(4, 3, 3, seed=4)))
    assert transpose_then_pointwise(t, spatial).reason is Reason.NOT_POINTWISE
    assert transpose_then_pointwise(t, ConvSpec(torch.zeros(4, 2, 1))).reason is Reason.CHANNEL_MISMATCH
    assert transpose_then_pointwise(t, ConvSpec(torch.zeros(4, 3, 1, 1))).reason is Reason.RANK_MISMATCH


# ----------------------------------------------------------------------------- before T
@settings(max_examples=100)
@given(data=st.data(), t=transpose_spec(), extra=st.tuples(st.integers(0, 3)))
def test_unbiased_pointwise_before_always_folds(
    data: st.DataObject, t: ConvTransposeSpec, extra: tuple[int]
) -> None:
    a = data.draw(pointwise(data.draw(st.integers(1, 3)) * t.groups, t.in_channels, t.ndim, bias=False))
    merged = pointwise_then_transpose(a, t)
    assert isinstance(merged, ConvTransposeSpec), merged
    assert merged.groups == np.gcd(t.groups, a.groups)
    x = torch.from_numpy(np_rand(2, a.in_channels, *[m + extra[0] for m in min_input(t)], seed=6))
    assert rel_err(run_transpose(t, a.apply(x)), run_transpose(merged, x)) <= TOL


def _check_shift_fold(a: ConvSpec, t: ConvTransposeSpec) -> ConvTransposeSpec | Decline:
    """Fold ``a`` then ``t``; a fold must be exact at every size, a decline must be necessary."""
    merged = pointwise_then_transpose(a, t)
    sizes = _sizes(t)
    if isinstance(merged, ConvTransposeSpec):
        for size in sizes:
            x = torch.from_numpy(np_rand(1, a.in_channels, *size, seed=sum(size)))
            assert rel_err(run_transpose(t, a.apply(x)), run_transpose(merged, x)) <= TOL, size
    else:
        assert merged.reason is Reason.SHIFT_NOT_CONSTANT, merged
        assert _response_varies(t, np.asarray(a.bias), sizes)  # no bias at all is right...
        naive = pointwise_then_transpose(a.replace(bias=None), t).replace(bias=_naive_bias(a, t))
        x = torch.from_numpy(np_rand(1, a.in_channels, *sizes[-1], seed=7))
        assert rel_err(run_transpose(t, a.apply(x)), run_transpose(naive, x)) > 1e-6  # ...nor the naive one
    return merged


@settings(max_examples=100)
@given(data=st.data(), t=transpose_spec(n=1))
def test_biased_pointwise_before_folds_or_declines_rightly(data: st.DataObject, t: ConvTransposeSpec) -> None:
    """Random geometry (1D, where every size can be tried): each outcome is checked both ways."""
    a = data.draw(pointwise(data.draw(st.integers(1, 3)), t.in_channels, 1, bias=True))
    _check_shift_fold(a, t)


@settings(max_examples=40)
@given(t=rim_cropped(), seed=st.integers(0, 2**20))
def test_shift_folds_when_crops_cover_the_rim(t: ConvTransposeSpec, seed: int) -> None:
    a = ConvSpec(
        torch.from_numpy(np_rand(t.in_channels, 2, *([1] * t.ndim), seed=seed)),
        torch.from_numpy(np_rand(t.in_channels, seed=seed + 1)),
    )
    assert isinstance(_check_shift_fold(a, t), ConvTransposeSpec)


@settings(max_examples=40)
@given(t=phase_balanced(), seed=st.integers(0, 2**20))
def test_shift_folds_when_phases_balance(t: ConvTransposeSpec, seed: int) -> None:
    a = ConvSpec(
        torch.from_numpy(np_rand(t.in_channels, 2, *([1] * t.ndim), seed=seed)),
        torch.from_numpy(np_rand(t.in_channels, seed=seed + 1)),
    )
    assert isinstance(_check_shift_fold(a, t), ConvTransposeSpec)


def _biased(ci: int, c1: int, n: int, seed: int) -> ConvSpec:
    return ConvSpec(
        torch.from_numpy(np_rand(c1, ci, *([1] * n), seed=seed)), torch.from_numpy(np_rand(c1, seed=seed + 1))
    )


def _bilinear(s: int, channels: int) -> np.ndarray:
    """FCN's bilinear upsampling kernel (k = 2s), one per channel, depthwise."""
    k = 2 * s
    centre = (k - 1) / 2
    f = 1 - np.abs(np.arange(k) - centre) / s
    return np.broadcast_to(np.outer(f, f), (channels, 1, k, k)).copy()


def test_bilinear_upsampler_declines_on_its_border() -> None:
    """The usual k=4, s=2, p=1 upsampler: phases balance in the interior, not on the rim."""
    t = ConvTransposeSpec(_bilinear(2, 3), stride=(2, 2), groups=3, pads=((1, 1), (1, 1)))
    a = _biased(2, 3, 2, seed=1)
    result = _check_shift_fold(a, t)
    assert isinstance(result, Decline)
    # Its twin crops the rim away (p = k - s = 2): one constant, folded.
    cropped = t.replace(pads=((2, 2), (2, 2)))
    assert isinstance(_check_shift_fold(a, cropped), ConvTransposeSpec)
    # That interior constant used for the p = 1 upsampler is right inside and wrong on the rim.
    interior = shift_response(cropped, np.asarray(a.bias))
    assert isinstance(interior, np.ndarray)
    folded = pointwise_then_transpose(a.replace(bias=None), t).replace(bias=interior)
    x = torch.from_numpy(np_rand(1, 2, 5, 5, seed=2))
    ref, out = run_transpose(t, a.apply(x)), run_transpose(folded, x)
    assert rel_err(ref[..., 1:-1, 1:-1], out[..., 1:-1, 1:-1]) <= TOL
    assert rel_err(ref, out) > 1e-3


def test_stride_two_random_kernel_declines_in_the_interior() -> None:
    t = ConvTransposeSpec(np_rand(3, 2, 4, seed=1), stride=(2,), pads=((3, 3),))
    a = _biased(2, 3, 1, seed=2)
    assert isinstance(_check_shift_fold(a, t), Decline)
    x = torch.zeros(1, 2, 8, dtype=torch.float64)  # zero input: the response alone,
    r = run_transpose(t, a.apply(x))  # alternating between the two phases
    assert float((r[..., 0::2] - r[..., 1::2]).abs().max()) > 1e-3


def test_stride_one_border_rim_declines() -> None:
    t = ConvTransposeSpec(np_rand(3, 2, 3, seed=1), pads=((1, 2),))  # pb = 1 < d(k-1) = 2
    a = _biased(2, 3, 1, seed=2)
    result = _check_shift_fold(a, t)
    assert isinstance(result, Decline) and "tap sets" in result.message
    assert isinstance(_check_shift_fold(a, t.replace(pads=((2, 2),))), ConvTransposeSpec)  # twin


def test_output_padding_past_the_end_crop_declines() -> None:
    """op > pe adds positions no tap reaches: they get T's bias only, not the shift's response."""
    t = ConvTransposeSpec(
        np_rand(3, 2, 2, seed=1), stride=(2,), dilation=(3,), pads=((3, 0),), output_padding=(2,)
    )
    a = _biased(2, 3, 1, seed=2)
    assert isinstance(_check_shift_fold(a, t), Decline)


def test_static_size_folds_where_every_size_does_not() -> None:
    """Stride 2, kernel 1: at input size 1 the output is one position, one tap set."""
    t = ConvTransposeSpec(np_rand(3, 2, 1, seed=1), stride=(2,))
    a = _biased(2, 3, 1, seed=2)
    assert isinstance(pointwise_then_transpose(a, t), Decline)
    merged = pointwise_then_transpose(a, t, spatial=(1,))
    assert isinstance(merged, ConvTransposeSpec)
    x = torch.from_numpy(np_rand(2, 2, 1, seed=3))
    assert rel_err(run_transpose(t, a.apply(x)), run_transpose(merged, x)) <= TOL
    x2 = torch.from_numpy(np_rand(2, 2, 2, seed=3))  # and only there
    assert rel_err(run_transpose(t, a.apply(x2)), run_transpose(merged, x2)) > 1e-3


def test_shift_response_values() -> None:
    t = ConvTransposeSpec(np_rand(2, 3, 3, seed=1), pads=((2, 2),))
    c = np_rand(2, seed=2)
    got = shift_response(t, c)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, np.einsum("c,cok->o", c, t.weight), rtol=1e-13)
    assert shift_response(t, np.ones(3)).reason is Reason.CHANNEL_MISMATCH
    assert shift_response(t, c, spatial=(4, 4)).reason is Reason.RANK_MISMATCH
    assert shift_response(t, c, spatial=(2,)).reason is Reason.UNSUPPORTED  # out = (2-1) + 3 - 4 = 0
    assert isinstance(shift_response(t, c, spatial=(3,)), np.ndarray)


@pytest.mark.parametrize("shifted", [False, True])
def test_batchnorm_before_transpose(shifted: bool) -> None:
    """BN (scale, shift) before T: the scale always folds; the shift by the shift rule."""
    t = ConvTransposeSpec(
        np_rand(4, 3, 4, 4, seed=1), np_rand(6, seed=2), stride=(2, 2), groups=2, pads=((1, 1), (1, 1))
    )
    shift = torch.from_numpy(np_rand(4, seed=4)) if shifted else torch.zeros(4, dtype=torch.float64)
    bn = ChannelAffine(torch.from_numpy(np_rand(4, seed=3)), shift)
    merged = affine_then_transpose(bn, t)
    x = torch.from_numpy(np_rand(2, 4, 5, 4, seed=5))
    ref = run_transpose(
        t, x * torch.from_numpy(bn.scale).view(1, -1, 1, 1) + torch.from_numpy(bn.shift).view(1, -1, 1, 1)
    )
    if not shifted:
        assert isinstance(merged, ConvTransposeSpec) and merged.groups == 2
        assert rel_err(ref, run_transpose(merged, x)) <= TOL
    else:
        assert isinstance(merged, Decline) and merged.reason is Reason.SHIFT_NOT_CONSTANT
        assert _response_varies(t, shift.numpy(), [(5, 4)])
        balanced = t.replace(pads=((3, 3), (3, 3)), stride=(1, 1))  # twin: rim cropped, stride 1
        merged = affine_then_transpose(bn, balanced)
        assert isinstance(merged, ConvTransposeSpec)
        ref = run_transpose(
            balanced,
            x * torch.from_numpy(bn.scale).view(1, -1, 1, 1) + torch.from_numpy(bn.shift).view(1, -1, 1, 1),
        )
        assert rel_err(ref, run_transpose(merged, x)) <= TOL


def test_strided_pointwise_before_declines() -> None:
    t = ConvTransposeSpec(np_rand(3, 2, 2, seed=1), stride=(2,))
    a = ConvSpec(torch.from_numpy(np_rand(3, 2, 1, seed=2)), stride=(2,))
    assert pointwise_then_transpose(a, t).reason is Reason.NOT_POINTWISE
    naive = pointwise_then_transpose(a.replace(stride=(1,)), t)  # the fold that ignores A's stride
    x = torch.from_numpy(np_rand(1, 2, 6, seed=3))
    assert run_transpose(t, a.apply(x)).shape != run_transpose(naive, x).shape


def test_float32_in_float32_out() -> None:
    t = ConvTransposeSpec(
        np_rand(4, 3, 3, seed=1).astype(np.float32), np_rand(3, seed=2).astype(np.float32), stride=(2,)
    )
    b = ConvSpec(torch.from_numpy(np_rand(5, 3, 1, seed=3)).float())
    merged = transpose_then_pointwise(t, b)
    assert (
        isinstance(merged, ConvTransposeSpec)
        and merged.dtype == np.float32
        and merged.bias.dtype == np.float32
    )
    x = torch.from_numpy(np_rand(1, 4, 6, seed=4))
    ref = F.conv1d(run_transpose(t, x), torch.from_numpy(b.weight).double())
    assert rel_err(ref, run_transpose(merged, x)) <= 1e-6


@settings(max_examples=60)
@given(
    k=st.integers(1, 6),
    s=st.integers(1, 4),
    d=st.integers(1, 3),
    pb=st.integers(0, 8),
    pe=st.integers(0, 8),
    op=st.integers(0, 3),
)
def test_tap_set_enumeration_bound_is_enough(k: int, s: int, d: int, pb: int, pe: int, op: int) -> None:
    """The sizes shift_response enumerates for 'every input size' show every tap set that much
    larger sizes show (the bound argued in _dynamic_sizes)."""
    from convfuse.transpose import _dim_tap_sets, _dynamic_sizes

    sizes = _dynamic_sizes(k, s, d, pb, pe, op)
    more = range(1, sizes.stop + 20)
    assert set(_dim_tap_sets(k, s, d, pb, pe, op, sizes)) == set(_dim_tap_sets(k, s, d, pb, pe, op, more))
