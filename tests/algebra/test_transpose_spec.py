"""ConvTransposeSpec: validation, the output-size formula, evaluation and the torch conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convfuse.frontends.torch.transpose import Crop, conv_transpose_from_spec, spec_from_conv_transpose
from convfuse.spec import InvalidSpecError
from convfuse.transpose import ConvTransposeSpec
from tests.support.helpers import rel_err
from tests.support.transpose_cases import input_for, np_rand, run_transpose, transpose_spec

TOL = 1e-9


@settings(max_examples=120)
@given(spec=transpose_spec(symmetric=True), extra=st.tuples(st.integers(0, 3), st.integers(0, 2)))
def test_torch_module_round_trip(spec: ConvTransposeSpec, extra: tuple[int, int]) -> None:
    """nn.ConvTransposeNd -> spec -> module; the spec's formula and numpy evaluation agree with torch."""
    module = conv_transpose_from_spec(spec)
    assert isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    back = spec_from_conv_transpose(module)
    assert (back.stride, back.dilation, back.groups, back.pads, back.output_padding) == (
        spec.stride,
        spec.dilation,
        spec.groups,
        spec.pads,
        spec.output_padding,
    )
    x = input_for(spec, extra, seed=1)
    ref = module(x)
    assert tuple(ref.shape[2:]) == spec.output_size(x.shape[2:])
    assert rel_err(ref, torch.from_numpy(back.apply(x.numpy()))) <= TOL


@settings(max_examples=120)
@given(spec=transpose_spec(), extra=st.tuples(st.integers(0, 3), st.integers(0, 2)))
def test_asymmetric_crops_become_a_module(spec: ConvTransposeSpec, extra: tuple[int, int]) -> None:
    """Any begin/end crops: one ConvTransposeNd where torch can say it, else ConvTranspose + Crop."""
    module = conv_transpose_from_spec(spec)
    x = input_for(spec, extra, seed=2)
    ref = run_transpose(spec, x)
    assert rel_err(ref, module(x)) <= TOL
    assert rel_err(ref, torch.from_numpy(spec.apply(x.numpy()))) <= TOL


def test_crop_module_used_only_where_needed() -> None:
    w = np_rand(2, 3, 4, seed=1)
    one = conv_transpose_from_spec(ConvTransposeSpec(w, stride=(2,), pads=((2, 1),)))  # op' = 1 < 2
    assert isinstance(one, nn.ConvTranspose1d) and one.padding == (2,) and one.output_padding == (1,)
    two = conv_transpose_from_spec(ConvTransposeSpec(w, stride=(2,), pads=((0, 2),)))  # op' = -2
    assert isinstance(two, nn.Sequential) and isinstance(two[1], Crop)
    x = torch.from_numpy(np_rand(1, 2, 5, seed=2))
    assert rel_err(run_transpose(ConvTransposeSpec(w, stride=(2,), pads=((0, 2),)), x), two(x)) <= TOL


def test_output_size_formula() -> None:
    spec = ConvTransposeSpec(
        np_rand(1, 1, 4, 3, seed=1),
        stride=(2, 3),
        dilation=(1, 2),
        pads=((1, 2), (0, 1)),
        output_padding=(1, 0),
    )
    # (n-1)*s + d*(k-1) + 1 - pb - pe + op
    assert spec.output_size((5, 4)) == (4 * 2 + 3 + 1 - 3 + 1, 3 * 3 + 4 + 1 - 1)


def test_float32_kept() -> None:
    spec = ConvTransposeSpec(
        np_rand(2, 3, 3, seed=1).astype(np.float32), np_rand(3, seed=2).astype(np.float32)
    )
    module = conv_transpose_from_spec(spec)
    assert module.weight.dtype == torch.float32
    assert spec_from_conv_transpose(module).dtype == np.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=np.zeros((2, 2))), "Ci, Co/g"),
        (dict(weight=np.zeros((2, 2, 3), dtype=np.int64)), "float array"),
        (dict(weight=torch.zeros(2, 2, 3)), "float array"),
        (dict(weight=np.zeros((2, 2, 3)), stride=(1, 1)), "needs 1 strides"),
        (dict(weight=np.zeros((2, 2, 3)), stride=(0,)), ">= 1"),
        (dict(weight=np.zeros((2, 2, 3)), pads=((-1, 0),)), ">= 0"),
        (dict(weight=np.zeros((2, 2, 3)), output_padding=(-1,)), ">= 0"),
        (dict(weight=np.zeros((3, 2, 3)), groups=2), "does not divide"),
        (dict(weight=np.zeros((2, 2, 3)), bias=np.zeros(3)), "does not match"),
    ],
)
def test_invalid_specs_raise_the_project_error(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidSpecError, match=match):
        ConvTransposeSpec(**kwargs)


def test_torch_refuses_too_much_output_padding() -> None:
    """A spec past torch's ``output_padding < max(stride, dilation)`` says so in one error."""
    spec = ConvTransposeSpec(np_rand(1, 1, 3, seed=1), stride=(2,), output_padding=(3,))
    with pytest.raises(InvalidSpecError, match="max\\(stride, dilation\\)"):
        conv_transpose_from_spec(spec)
