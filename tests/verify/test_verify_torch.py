"""The verifier on nn.Modules: pass what matches, fail what does not, never change the caller's modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convfuse import algebra, verify
from convfuse.decline import Decline
from convfuse.errors import ConvfuseError, DeviceUnavailableError
from convfuse.frontends.torch.layers import conv_from_spec, spec_from_conv
from convfuse.testing import assert_equivalent
from convfuse.verify import verify_modules


def _chain_and_merge(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """conv 3x3 (pad 1) then conv 1x1 and its exact merge (one 3x3 conv), via the algebra."""
    torch.manual_seed(seed)
    chain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 5, 1)).to(dtype)
    merged = algebra.compose_chain([spec_from_conv(chain[0]), spec_from_conv(chain[1])])
    assert not isinstance(merged, Decline)
    return chain, conv_from_spec(merged)


def test_an_exact_merge_passes_with_example_inputs_and_with_shapes() -> None:
    chain, merged = _chain_and_merge()
    x = torch.randn(2, 3, 10, 10)
    result = verify(chain, merged, example_inputs=x)
    assert result.passed and result.kind == "torch" and result.samples == 1
    assert result.checks[0].name == "output" and result.checks[0].dtype == "float32"
    assert 0 < result.checks[0].max_rel_error < 1e-6
    shaped = verify(chain, merged, input_shapes=(1, 3, 12, 12), samples=3, seed=4)
    assert shaped.passed and shaped.samples == 3 and shaped.inputs == (("input0", "float32", (1, 3, 12, 12)),)


def test_a_perturbed_merge_fails() -> None:
    chain, merged = _chain_and_merge()
    with torch.no_grad():
        w = merged.weight.view(-1)
        i = int(w.abs().argmax())
        w[i] *= 1 + 1e-3
    result = verify(chain, merged, input_shapes=[(1, 3, 12, 12)])
    assert not result.passed and result.exit_code == 1
    assert result.checks[0].comparison is not None and result.checks[0].comparison.location == "everywhere"
    with pytest.raises(AssertionError, match="FAIL"):
        assert_equivalent(chain, merged, input_shapes=(1, 3, 12, 12))


def test_a_naive_padded_merge_fails_on_the_border() -> None:
    torch.manual_seed(1)
    chain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1))
    unpadded = [spec_from_conv(chain[0]), spec_from_conv(chain[1]).replace(pads=((0, 0), (0, 0)))]
    merged = algebra.compose_chain(unpadded)
    assert not isinstance(merged, Decline)
    naive = conv_from_spec(merged.replace(pads=((2, 2), (2, 2))))
    result = verify(chain, naive, input_shapes=(1, 3, 16, 16))
    c = result.checks[0].comparison
    assert not result.passed and c is not None and (c.location, c.border_width) == ("border", 1)


class _TwoHeads(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = scale

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
        c = self.conv(x)
        return {"sum": c + y, "pair": (c.argmax(dim=1), torch.relu(c) * self.scale)}


def test_several_inputs_and_nested_outputs() -> None:
    torch.manual_seed(0)
    a = _TwoHeads()
    b = _TwoHeads()
    b.load_state_dict(a.state_dict())
    result = verify(a, b, input_shapes=[(1, 3, 8, 8), (1, 4, 8, 8)])
    assert result.passed
    assert [c.name for c in result.checks] == ["output['sum']", "output['pair'][0]", "output['pair'][1]"]
    assert [c.exact for c in result.checks] == [False, True, False]
    b.scale = 1.001
    scaled = verify(a, b, input_shapes=[(1, 3, 8, 8), (1, 4, 8, 8)])
    assert [c.passed for c in scaled.checks] == [True, True, False]


def test_modules_are_compared_in_eval_mode_without_changing_the_caller() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ref[1].running_mean.normal_()
    ref[1].running_var.uniform_(0.5, 2.0)
    ref.train()
    fused = algebra.then_affine(
        spec_from_conv(ref[0]),
        algebra.ChannelAffine.from_batchnorm(
            ref[1].running_mean, ref[1].running_var, ref[1].weight, ref[1].bias, ref[1].eps
        ),
    )
    assert not isinstance(fused, Decline)
    cand = conv_from_spec(fused)
    stats = ref[1].running_mean.clone()
    result = verify(ref, cand, input_shapes=(2, 3, 8, 8))
    assert result.passed, result.to_text()
    assert any("reference was in training mode" in n for n in result.notes)
    assert not any("candidate" in n for n in result.notes)  # a plain conv behaves the same either way
    assert ref.training and ref[1].training  # the caller's module keeps its mode
    assert torch.equal(ref[1].running_mean, stats)  # and its statistics


def test_module_dtype_sets_the_generated_inputs_and_tolerance() -> None:
    chain, merged = _chain_and_merge(dtype=torch.float64)
    result = verify(chain, merged, input_shapes=(1, 3, 8, 8))
    assert result.passed and result.checks[0].dtype == "float64" and result.checks[0].rtol == 1e-9
    assert result.inputs[0][1] == "float64"
    chain32, merged32 = _chain_and_merge()  # float32 kernels are 1e-8 off in float64: caught
    assert not verify(chain32.double(), merged32.double(), input_shapes=(1, 3, 8, 8)).passed
    half = verify(chain32.bfloat16(), merged32.bfloat16(), input_shapes=(1, 3, 8, 8))
    assert half.inputs[0][1] == "bfloat16" and half.checks[0].rtol == 5e-2
    assert half.passed, half.to_text()


def test_bad_module_input_is_an_error() -> None:
    chain, merged = _chain_and_merge()
    with pytest.raises(ConvfuseError, match="example_inputs or input_shapes"):
        verify_modules(chain, merged)
    with pytest.raises(ConvfuseError, match="reference module failed on inputs of shape 1x4x8x8"):
        verify(chain, merged, input_shapes=(1, 4, 8, 8))
    pair = nn.ModuleList([chain])
    pair.forward = lambda x: (chain(x), chain(x))  # type: ignore[method-assign]
    with pytest.raises(ConvfuseError, match="different outputs: output vs output\\[0\\], output\\[1\\]"):
        verify(chain, pair, example_inputs=torch.randn(1, 3, 8, 8))


def test_cuda_requested_without_cuda_raises_device_unavailable() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA for torch")
    chain, merged = _chain_and_merge()
    with pytest.raises(DeviceUnavailableError, match="torch.cuda.is_available"):
        verify(chain, merged, input_shapes=(1, 3, 8, 8), device="cuda")
    result = verify(chain, merged, input_shapes=(1, 3, 8, 8), device="all")
    assert result.devices == ("cpu",) and any("cuda not checked" in n for n in result.notes)
