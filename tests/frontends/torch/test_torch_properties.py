"""Property tests: whatever ``convfuse.fuse`` merges or declines, outputs never change (float64)."""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import convfuse
from tests.support._torch_models import count_convs, rel_error

TOL64 = 1e-10
_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
_PAD = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d}
#: Examples per property; raise it for a long sweep (CONVFUSE_EXAMPLES=2000 pytest ...).
_SETTINGS = settings(
    max_examples=int(os.environ.get("CONVFUSE_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics, float64, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model.double().eval()


def _layers(model: nn.Module) -> int:
    return sum(next(m.children(), None) is None for m in model.modules())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _conv(draw, nd: int, c_in: int, spatial: bool = True) -> nn.Module:
    c_out = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    groups = draw(st.sampled_from(_divisors(math.gcd(c_in, c_out))))
    k = draw(st.integers(1, 3)) if spatial else 1
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding: int | str = draw(st.integers(0, dilation * (k - 1)))
    if stride == 1 and draw(st.booleans()):
        padding = "same"
    mode = "zeros"
    if padding not in (0, "same") and draw(st.integers(0, 4)) == 0:
        mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
    return _CONV[nd](c_in, c_out, k, stride, padding, dilation, groups, draw(st.booleans()), mode)


@st.composite
def _chains(draw) -> tuple[nn.Module, tuple[int, ...], str]:
    nd = draw(st.sampled_from([1, 2]))
    c = draw(st.sampled_from([1, 2, 3, 4]))
    c0 = c
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(
            st.sampled_from(
                ["conv", "conv", "conv", "conv", "bn", "identity", "dropout", "pad", "pool", "relu"]
            )
        )
        if kind == "conv":
            conv = draw(_conv(nd, c))
            layers.append(conv)
            c = conv.out_channels
        elif kind == "bn":
            layers.append(_BN[nd](c))
        elif kind == "identity":
            layers.append(nn.Identity())
        elif kind == "dropout":
            layers.append(nn.Dropout(0.5))
        elif kind == "pad":
            layers.append(_PAD[nd](tuple(draw(st.integers(0, 2)) for _ in range(2 * nd)), 0.0))
        elif kind == "pool":
            k = draw(st.integers(1, 3))
            layers.append(_POOL[nd](k, draw(st.integers(1, 2)), draw(st.integers(0, k // 2))))
        else:
            layers.append(nn.ReLU())
    if draw(st.booleans()):  # a nested Sequential somewhere
        cut = draw(st.integers(0, len(layers)))
        layers = layers[:cut] + [nn.Sequential(*layers[cut:])] if cut < len(layers) else layers
    shape = (2, c0, *[draw(st.integers(9, 14)) for _ in range(nd)])
    return nn.Sequential(*layers), shape, draw(st.sampled_from(["flops", "always"]))


@_SETTINGS
@given(case=_chains(), seed=st.integers(0, 2**16))
def test_random_chains_keep_outputs(case, seed: int) -> None:
    model, shape, policy = case
    model = _randomise(model, seed)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError:
        assume(False)  # input too small for this random stack
    assume(ref.numel() > 0 and float(ref.abs().max()) > 0)
    fused, report = convfuse.fuse(model, policy=policy, return_report=True)
    assert isinstance(fused, nn.Sequential)
    with torch.no_grad():
        out = fused(x)
    assert out.shape == ref.shape
    assert rel_error(ref, out) <= TOL64, report.to_text()
    assert _layers(fused) <= _layers(model)
    if policy == "flops":
        assert report.after.params <= report.before.params, report.to_text()


class _Branchy(nn.Module):
    """Branches of one input, summed one of several ways, then a nonlinearity."""

    def __init__(self, branches: list[nn.Module], identity: bool, how: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = identity
        self.how = how

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        if self.identity:
            outs.append(x)
        if self.how == "sum":
            y = sum(outs)
        elif self.how == "plus":
            y = outs[0]
            for o in outs[1:]:
                y = y + o
        else:
            y = outs[-1]
            for o in reversed(outs[:-1]):
                y = torch.add(o, y)
        return torch.tanh(y)


@st.composite
def _branch(draw, nd: int, c_in: int, c_out: int, stride: int) -> nn.Module:
    """One branch whose output grid is the 'same'-padded grid at ``stride``."""
    kind = draw(st.sampled_from(["conv", "conv", "conv", "1x1-kxk", "bn", "pool", "asym"]))
    if kind in ("bn", "pool") and (c_in != c_out or (kind == "bn" and stride != 1)):
        kind = "conv"
    if kind == "bn":
        return _BN[nd](c_in)
    if kind == "pool":
        k = draw(st.sampled_from([1, 3]))
        return _POOL[nd](k, stride, k // 2, count_include_pad=True)
    k = draw(st.sampled_from([1, 3, 5]))
    d = draw(st.sampled_from([1, 2])) if k > 1 else 1
    kernel: tuple[int, ...] | int = k
    padding: tuple[int, ...] | int = d * (k - 1) // 2
    if kind == "asym" and nd == 2:
        kernel, padding = ((1, k), (0, padding)) if draw(st.booleans()) else ((k, 1), (padding, 0))
    groups = draw(st.sampled_from(_divisors(math.gcd(c_in, c_out))))
    if kind == "1x1-kxk":
        mid = draw(st.sampled_from([c_in, 2 * c_in]))
        # DBB style: the 1x1 pads its input and the kxk has none, so the pair is exact.
        return nn.Sequential(
            _CONV[nd](c_in, mid, 1, padding=padding, bias=False), _BN[nd](mid),
            _CONV[nd](mid, c_out, kernel, stride, 0, d), _BN[nd](c_out),
        )  # fmt: skip
    conv = _CONV[nd](c_in, c_out, kernel, stride, padding, d, groups, draw(st.booleans()))
    return nn.Sequential(conv, _BN[nd](c_out)) if draw(st.booleans()) else conv


@st.composite
def _blocks(draw) -> tuple[nn.Module, tuple[int, ...], str]:
    nd = draw(st.sampled_from([1, 2]))
    c_in = draw(st.sampled_from([2, 3, 4]))
    c_out = draw(st.sampled_from([c_in, c_in, 4, 6]))
    stride = draw(st.sampled_from([1, 1, 2]))
    branches = [draw(_branch(nd, c_in, c_out, stride)) for _ in range(draw(st.integers(1, 4)))]
    identity = c_in == c_out and stride == 1 and draw(st.booleans())
    if len(branches) == 1 and not identity:
        branches.append(draw(_branch(nd, c_in, c_out, stride)))
    block = _Branchy(branches, identity, draw(st.sampled_from(["sum", "plus", "torch.add"])))
    shape = (2, c_in, *[draw(st.integers(7, 11)) for _ in range(nd)])
    return block, shape, draw(st.sampled_from(["flops", "always"]))


@_SETTINGS
@given(case=_blocks(), seed=st.integers(0, 2**16))
def test_random_branch_sums_keep_outputs(case, seed: int) -> None:
    model, shape, policy = case
    model = _randomise(model, seed)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x)
    fused, report = convfuse.fuse(model, policy=policy, return_report=True)
    with torch.no_grad():
        out = fused(x)
    assert rel_error(ref, out) <= TOL64, report.to_text()
    if policy == "always":
        assert count_convs(fused) <= 1 + sum(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules()
        ), report.to_text()
