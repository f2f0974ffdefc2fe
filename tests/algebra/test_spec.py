"""ConvSpec, its torch conversions, simplify and the cost figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convfuse.algebra import Cost, compose, cost, simplify
from convfuse.frontends.torch.layers import conv_from_spec, spec_from_conv
from convfuse.policy import Policy, judge
from convfuse.spec import ConvSpec, InvalidSpecError, same_pads
from tests.support.helpers import rel_err
from tests.support.strategies import rand

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 4, "padding": "same"},  # even kernel: asymmetric (1, 2)
        {"kernel_size": 2, "padding": "same", "dilation": 3},  # odd total 3: (1, 2)
        {"kernel_size": 3, "padding": "valid", "stride": 2},
        {"kernel_size": 3, "padding": 2, "padding_mode": "reflect"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "replicate"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "circular", "groups": 2},
        {"kernel_size": 1, "bias": False},
    ],
)
def test_torch_round_trip(ndim: int, kwargs: dict) -> None:
    conv = CONVS[ndim - 1](4, 6, **kwargs).double()
    spec = spec_from_conv(conv)
    x = rand(2, 4, *([7] * ndim), seed=1)
    assert rel_err(conv(x), spec.apply(x)) <= 1e-12
    back = conv_from_spec(spec)
    assert rel_err(conv(x), back(x)) <= 1e-12
    assert (
        back.weight.data_ptr() != conv.weight.data_ptr()
        if isinstance(back, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        else True
    )


def test_same_padding_even_kernel_is_asymmetric() -> None:
    conv = nn.Conv2d(2, 2, (4, 3), padding="same")
    assert spec_from_conv(conv).pads == ((1, 2), (1, 1))
    assert same_pads((4,), (1,), upper=False) == ((2, 1),)  # SAME_LOWER puts the extra first
    back = conv_from_spec(spec_from_conv(conv))
    assert isinstance(back, nn.Sequential)  # torch convs pad symmetrically: explicit pad layer
    x = torch.randn(1, 2, 6, 5)
    torch.testing.assert_close(conv(x), back(x))


def test_symmetric_spec_becomes_a_plain_conv() -> None:
    """Twin of the above: symmetric pads need no pad layer."""
    back = conv_from_spec(spec_from_conv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")))
    assert isinstance(back, nn.Conv2d) and back.padding_mode == "reflect"


def test_asymmetric_reflect_spec_uses_a_reflection_pad() -> None:
    spec = ConvSpec(rand(3, 2, 3, 3, seed=1), pads=((0, 2), (1, 1)), padding_mode="reflect")
    back = conv_from_spec(spec)
    assert isinstance(back, nn.Sequential) and isinstance(back[0], nn.ReflectionPad2d)
    x = rand(1, 2, 5, 5, seed=2)
    assert rel_err(spec.apply(x), back(x)) <= 1e-12


def test_dtype_is_kept_by_conversions() -> None:
    conv = nn.Conv2d(2, 3, 3).half()
    spec = spec_from_conv(conv)
    assert spec.dtype == np.float16 and conv_from_spec(spec).weight.dtype == torch.float16


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"weight": torch.zeros(4, 2)}, "weight must be"),
        ({"weight": torch.zeros(4, 2, 3), "groups": 3}, "groups=3"),
        ({"weight": torch.zeros(4, 2, 3), "stride": (0,)}, "strides"),
        ({"weight": torch.zeros(4, 2, 3), "pads": ((-1, 0),)}, "pads"),
        ({"weight": torch.zeros(4, 2, 3), "padding_mode": "mirror"}, "padding_mode"),
        ({"weight": torch.zeros(4, 2, 3), "bias": torch.zeros(3)}, "bias shape"),
        ({"weight": torch.zeros(4, 2, 3, 3), "stride": (1,)}, "needs 2"),
    ],
)
def test_invalid_specs_raise_with_shapes(kwargs: dict, fragment: str) -> None:
    with pytest.raises(InvalidSpecError, match=fragment):
        ConvSpec(**kwargs)


def test_output_size_matches_torch() -> None:
    spec = ConvSpec(rand(2, 2, 3, 4, seed=1), stride=(2, 3), dilation=(2, 1), pads=((1, 0), (2, 1)))
    x = rand(1, 2, 11, 13, seed=2)
    assert spec.apply(x).shape[2:] == spec.output_size((11, 13))


# ----------------------------------------------------------------------------- simplify
def test_simplify_trims_zero_border_taps_into_padding() -> None:
    w = torch.zeros(2, 2, 5, 5, dtype=torch.float64)
    w[:, :, 1:4, 1:4] = rand(2, 2, 3, 3, seed=1)
    spec = ConvSpec(w, pads=((2, 2), (2, 2)))
    small = simplify(spec)
    assert small.kernel_size == (3, 3) and small.pads == ((1, 1), (1, 1))
    x = rand(1, 2, 6, 6, seed=2)
    assert rel_err(spec.apply(x), small.apply(x)) <= 1e-12


def test_simplify_keeps_taps_padding_cannot_absorb() -> None:
    """Twin: with no padding to give back, trimming would change the output size: keep them."""
    w = torch.zeros(2, 2, 5, dtype=torch.float64)
    w[:, :, 1:4] = rand(2, 2, 3, seed=1)
    spec = ConvSpec(w, pads=((0, 1),))
    small = simplify(spec)
    assert small.kernel_size == (4,) and small.pads == ((0, 0),)
    x = rand(1, 2, 9, seed=2)
    assert rel_err(spec.apply(x), small.apply(x)) <= 1e-12


def test_simplify_finds_block_diagonal_groups() -> None:
    w = torch.zeros(4, 4, 3, dtype=torch.float64)
    w[:2, :2] = rand(2, 2, 3, seed=1)
    w[2:, 2:] = rand(2, 2, 3, seed=2)
    small = simplify(ConvSpec(w))
    assert small.groups == 2 and small.weight.shape == (4, 2, 3)
    w[0, 3, 1] = 1.0  # one off-block tap: dense again
    assert simplify(ConvSpec(w)).groups == 1


# ----------------------------------------------------------------------------- cost
def test_cost_of_expand_chain_and_its_merge() -> None:
    """1x1 C->4C, 3x3 4C->4C, 1x1 4C->C against one 3x3 C->C: ~18x fewer MACs."""
    c = 8
    chain = [
        ConvSpec(rand(4 * c, c, 1, 1, seed=1)),
        ConvSpec(rand(4 * c, 4 * c, 3, 3, seed=2), pads=((1, 1), (1, 1))),
        ConvSpec(rand(c, 4 * c, 1, 1, seed=3)),
    ]
    before = cost(chain)
    assert before == Cost(macs=4 * c * c + 16 * c * c * 9 + 4 * c * c, params=(4 + 144 + 4) * c * c)
    merged = ConvSpec(rand(c, c, 3, 3, seed=4), pads=((1, 1), (1, 1)))
    assert cost([merged]) == Cost(9 * c * c, 9 * c * c)
    assert judge(Policy.FLOPS, before, cost([merged])) is None


def test_cost_scales_earlier_layers_by_stride() -> None:
    a = ConvSpec(rand(4, 4, 1, 1, seed=1))  # runs at 4x the positions of the strided layer
    b = ConvSpec(rand(4, 4, 1, 1, seed=2), stride=(2, 2))
    assert cost([a, b]).macs == 16 * 4 + 16


def test_depthwise_pointwise_merge_does_not_pay() -> None:
    """Negative twin: depthwise 3x3 + pointwise 1x1 becomes a dense 3x3, ~k^2 more work."""
    c = 16
    dw = ConvSpec(rand(c, 1, 3, 3, seed=1), pads=((1, 1), (1, 1)), groups=c)
    pw = ConvSpec(rand(c, c, 1, 1, seed=2))
    merged = compose(dw, pw)
    assert isinstance(merged, ConvSpec) and merged.groups == 1
    decline = judge(Policy.FLOPS, cost([dw, pw]), cost([merged]))
    assert decline is not None and decline.reason.value == "not-profitable"
    assert judge("always", cost([dw, pw]), cost([merged])) is None
    with pytest.raises(ValueError, match="unknown policy"):
        judge("fastest", cost([dw, pw]), cost([merged]))


# ----------------------------------------------------------------------------- numpy arrays
def test_spec_holds_numpy_views_of_torch_weights() -> None:
    """A torch weight handed in is viewed, not copied; the spec holds numpy arrays."""
    conv = nn.Conv2d(3, 4, 3)
    spec = spec_from_conv(conv)
    assert isinstance(spec.weight, np.ndarray) and isinstance(spec.bias, np.ndarray)
    assert np.shares_memory(spec.weight, conv.weight.detach().numpy())


def test_spec_rejects_what_is_not_an_array() -> None:
    with pytest.raises(InvalidSpecError, match="must be"):
        ConvSpec(weight=[[[1.0]]])  # type: ignore[arg-type]
    with pytest.raises(InvalidSpecError, match="bias must be an array"):
        ConvSpec(weight=np.ones((2, 1, 1)), bias=[1.0, 2.0])  # type: ignore[arg-type]


def test_shape_only_arrays_hold_no_data() -> None:
    from convfuse.spec import is_shape_only, shape_only

    w = shape_only((256, 256, 3, 3))
    assert w.shape == (256, 256, 3, 3) and w.nbytes > 2**20 and is_shape_only(w)
    assert not w.flags.writeable
    assert not is_shape_only(np.zeros((2, 2, 1)))  # negative twin: a real array
