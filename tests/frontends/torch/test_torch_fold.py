"""Issue 16, torch half: computation that reads only module state folds to a constant weight, so
the conv it feeds merges with its neighbours; never what reads a buffer the forward updates, nor
anything random."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from convfuse.decline import Reason
from tests.frontends.torch.test_torch_capture import _fuse, _reasons, conv_calls


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _loads(fused: nn.Module, x: torch.Tensor) -> None:
    again = copy.deepcopy(fused)
    again.load_state_dict(fused.state_dict())
    assert torch.equal(again(x), fused(x))


class _GainConv(nn.Module):
    """``F.conv2d(x, weight * gain)`` then a BN; ``update``: the forward writes ``gain`` in place
    (its value stays, so outputs repeat, but it is a buffer updated in forward)."""

    def __init__(self, update: bool = False, noise: bool = False) -> None:
        super().__init__()
        self.update, self.noise = update, noise
        self.weight = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.register_buffer("gain", torch.full((8, 1, 1, 1), 0.5))
        self.bn = _bn(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.update:
            self.gain.mul_(1.0)
        w = self.weight * self.gain
        if self.noise:
            w = w + 0.0 * torch.randn_like(w)
        return self.bn(F.conv2d(x, w, padding=1))


def test_parameter_only_weight_folds_and_merges_with_bn() -> None:
    torch.manual_seed(0)
    model = _GainConv().eval()
    x = torch.randn(2, 4, 9, 9)
    fused, report = _fuse(model, x)
    assert conv_calls(fused, x) == 1 and _batchnorms(fused) == 0
    assert any(m.group.value == "constant folded" for m in report.merges)
    _loads(fused, x)


def test_buffer_updated_in_forward_is_not_folded() -> None:
    torch.manual_seed(0)
    model = _GainConv(update=True).eval()
    x = torch.randn(2, 4, 9, 9)
    fused, report = _fuse(model, x)
    assert any("gain (in place)" in d.decline.message for d in report.declines)
    assert not any(m.group.value == "constant folded" for m in report.merges)
    assert _batchnorms(fused) == 1
    assert model.gain.eq(0.5).all()


def test_random_is_not_folded() -> None:
    torch.manual_seed(0)
    model = _GainConv(noise=True).eval()
    x = torch.randn(2, 4, 9, 9)
    fused, report = _fuse(model, x)
    assert Reason.NONDETERMINISTIC in _reasons(report)
    assert _batchnorms(fused) == 1


class _ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, between: nn.Module | None = None) -> None:
        super().__init__()
        self.conv, self.bn = conv, _bn(8)
        self.act = between if between is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.act(self.conv(x)))


def test_weight_norm_conv_merges_with_bn() -> None:
    torch.manual_seed(1)
    model = _ConvBN(weight_norm(nn.Conv2d(4, 8, 3, padding=1))).eval()
    x = torch.randn(2, 4, 8, 8)
    fused, _ = _fuse(model, x)
    assert conv_calls(fused, x) == 1 and _batchnorms(fused) == 0
    assert not any("parametrizations" in k for k in fused.state_dict())
    _loads(fused, x)


def test_weight_norm_conv_behind_relu_keeps_its_parametrization() -> None:
    torch.manual_seed(1)
    model = _ConvBN(weight_norm(nn.Conv2d(4, 8, 3, padding=1)), nn.ReLU()).eval()
    x = torch.randn(2, 4, 8, 8)
    fused, _ = _fuse(model, x)
    assert _batchnorms(fused) == 1
    assert any("parametrizations" in k for k in fused.state_dict())


class LoRAConv2d(nn.Conv2d):
    """A conv with a low-rank update ``W + (B @ A) * scaling``, as LoRA libraries write it;
    ``from_input``: the scaling is read from the input (only ``B @ A`` is state-only then)."""

    def __init__(self, *args: object, rank: int = 2, from_input: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.lora_A = nn.Parameter(torch.randn(rank, fan_in) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(self.out_channels, rank) * 0.1)
        self.scaling = 0.5
        self.from_input = from_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaling = x.mean() * 0 + self.scaling if self.from_input else self.scaling
        delta = (self.lora_B @ self.lora_A).view(self.weight.shape) * scaling
        return F.conv2d(x, self.weight + delta, self.bias, self.stride, self.padding)


def test_lora_conv_folds_and_merges_with_bn() -> None:
    torch.manual_seed(2)
    model = _ConvBN(LoRAConv2d(4, 8, 3, padding=1)).eval()
    x = torch.randn(2, 4, 8, 8)
    fused, report = _fuse(model, x)
    assert conv_calls(fused, x) == 1 and _batchnorms(fused) == 0
    assert not any("lora" in k for k in fused.state_dict())
    _loads(fused, x)
    assert any(m.group.value == "constant folded" for m in report.merges)


def test_lora_scaled_by_the_input_is_not_folded() -> None:
    torch.manual_seed(2)
    model = _ConvBN(LoRAConv2d(4, 8, 3, padding=1, from_input=True)).eval()
    x = torch.randn(2, 4, 8, 8)
    fused, report = _fuse(model, x)
    assert _batchnorms(fused) == 1  # the weight reads the input: the conv is not a constant conv
    assert not any(m.group.value in ("conv+bn", "conv+affine") for m in report.merges)
