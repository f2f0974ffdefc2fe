"""BatchNorm and per-channel constants: conv then BN, BN then conv, BN alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convfuse.algebra import ChannelAffine, add, affine_conv, compose, then_affine
from convfuse.decline import Decline, Reason
from convfuse.frontends.torch.layers import affine_from_batchnorm, spec_from_conv
from convfuse.spec import ConvSpec
from tests.support.helpers import rel_err
from tests.support.strategies import rand

TOL = 1e-9


def _bn(c: int, ndim: int, seed: int) -> nn.Module:
    """An eval-mode BatchNorm with non-trivial statistics, in float64."""
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1](c, eps=1e-3).double()
    with torch.no_grad():
        bn.running_mean.copy_(rand(c, seed=seed))
        bn.running_var.copy_(rand(c, seed=seed + 1).abs() + 0.1)
        bn.weight.copy_(rand(c, seed=seed + 2))
        bn.bias.copy_(rand(c, seed=seed + 3))
    return bn.eval()


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_then_bn(ndim: int, groups: int) -> None:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1](4, 6, 3, padding=1, groups=groups).double()
    bn = _bn(6, ndim, seed=1)
    affine = affine_from_batchnorm(bn)
    assert isinstance(affine, ChannelAffine)
    merged = then_affine(spec_from_conv(conv), affine)
    x = rand(2, 4, *([5] * ndim), seed=2)
    assert rel_err(bn(conv(x)), merged.apply(x)) <= TOL
    assert merged.groups == groups


def test_bn_in_training_mode_declines() -> None:
    bn = _bn(6, 2, seed=1).train()
    result = affine_from_batchnorm(bn)
    assert isinstance(result, Decline) and result.reason is Reason.TRAINING_MODE
    assert ".eval()" in result.message
    bn_no_stats = nn.BatchNorm2d(6, track_running_stats=False).eval()
    result = affine_from_batchnorm(bn_no_stats)
    assert isinstance(result, Decline) and result.reason is Reason.TRAINING_MODE


def test_bn_then_unpadded_conv_merges() -> None:
    bn = _bn(4, 2, seed=3)
    conv = nn.Conv2d(4, 5, 3, stride=2).double()
    affine = affine_from_batchnorm(bn)
    assert isinstance(affine, ChannelAffine)
    merged = compose(affine_conv(affine, 2), spec_from_conv(conv))
    x = rand(2, 4, 9, 9, seed=4)
    assert rel_err(conv(bn(x)), merged.apply(x)) <= TOL


def test_bn_then_padded_conv_declines_case2() -> None:
    """Twin: BN's shift is a bias on a pointwise map, so a zero-padded conv after it is case 2."""
    bn = _bn(4, 2, seed=3)
    conv = nn.Conv2d(4, 5, 3, padding=1).double()
    affine = affine_from_batchnorm(bn)
    assert isinstance(affine, ChannelAffine)
    result = compose(affine_conv(affine, 2), spec_from_conv(conv))
    assert isinstance(result, Decline) and result.reason is Reason.PADDED_AFTER_BIASED_POINTWISE


def test_bn_alone_is_a_depthwise_affine_on_a_branch() -> None:
    """RepVGG/MobileOne identity branch: BN alone, summed with a conv+BN branch."""
    c = 4
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).double()
    bn_conv, bn_id = _bn(c, 2, seed=5), _bn(c, 2, seed=9)
    a_conv, a_id = affine_from_batchnorm(bn_conv), affine_from_batchnorm(bn_id)
    assert isinstance(a_conv, ChannelAffine) and isinstance(a_id, ChannelAffine)
    branch = then_affine(spec_from_conv(conv), a_conv)
    assert not isinstance(branch, Decline)
    merged = add([branch, affine_conv(a_id, 2)])
    assert not isinstance(merged, Decline)
    x = rand(2, c, 6, 6, seed=6)
    assert rel_err(bn_conv(conv(x)) + bn_id(x), merged.apply(x)) <= TOL


def test_per_channel_and_scalar_constants() -> None:
    conv = nn.Conv2d(3, 4, 3).double()
    scale, shift = rand(4, seed=1), rand(4, seed=2)
    merged = then_affine(spec_from_conv(conv), ChannelAffine(scale, shift))
    x = rand(1, 3, 6, 6, seed=3)
    assert rel_err(conv(x) * scale.view(1, 4, 1, 1) + shift.view(1, 4, 1, 1), merged.apply(x)) <= TOL
    scalar = ChannelAffine(
        torch.full((4,), 0.5, dtype=torch.float64), torch.full((4,), 2.0, dtype=torch.float64)
    )
    merged = then_affine(spec_from_conv(conv), scalar)
    assert rel_err(conv(x) * 0.5 + 2.0, merged.apply(x)) <= TOL
    # Negative twin: a constant with the wrong channel count is declined, not broadcast.
    result = then_affine(spec_from_conv(conv), ChannelAffine(rand(3, seed=1), rand(3, seed=2)))
    assert isinstance(result, Decline) and result.reason is Reason.CHANNEL_MISMATCH


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_per_channel_shortcuts_of_compose_are_exact(groups: int) -> None:
    """compose takes a shortcut when one side is a per-channel affine; it must equal the oracle."""
    scale = affine_conv(ChannelAffine(rand(6, seed=1), rand(6, seed=2)), 2)
    conv = ConvSpec(rand(6, 6 // groups, 3, 3, seed=3), rand(6, seed=4), stride=(2, 1), groups=groups)
    x = rand(2, 6, 9, 8, seed=5)
    for a, b in ((conv, scale), (scale, conv)):
        merged = compose(a, b)
        assert isinstance(merged, ConvSpec) and merged.groups == groups
        assert rel_err(b.apply(a.apply(x)), merged.apply(x)) <= TOL
    # A zero-shift scale before a padded conv is case 1 (exact); a shifted one is case 2.
    no_shift = affine_conv(ChannelAffine(rand(6, seed=1), torch.zeros(6, dtype=torch.float64)), 2)
    padded = conv.replace(pads=((1, 1), (1, 1)))
    merged = compose(no_shift, padded)
    assert isinstance(merged, ConvSpec) and merged.pads == ((1, 1), (1, 1))
    assert rel_err(padded.apply(no_shift.apply(x)), merged.apply(x)) <= TOL
    assert compose(scale, padded).reason is Reason.PADDED_AFTER_BIASED_POINTWISE


def test_conv_bn_on_wide_layers() -> None:
    """2048 channels: the shortcut scales the weight (the dense route would build 2048x2048)."""
    conv = ConvSpec(rand(2048, 16, 3, 3, seed=1), pads=((1, 1), (1, 1)))
    bn = affine_conv(ChannelAffine(rand(2048, seed=2).abs() + 0.5, rand(2048, seed=3)), 2)
    merged = compose(conv, bn)
    assert isinstance(merged, ConvSpec) and merged.weight.shape == (2048, 16, 3, 3)
    x = rand(1, 16, 5, 5, seed=4)
    assert rel_err(bn.apply(conv.apply(x)), merged.apply(x)) <= TOL
