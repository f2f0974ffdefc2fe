"""Patterns of the torch front end one by one, each with a negative twin; API and report."""

from __future__ import annotations

import json
import operator
import pickle

import pytest
import torch
from torch import nn

import convfuse
from convfuse import Reason
from convfuse.errors import InvalidModelError, TrainingModeError
from convfuse.report import MergeKind, Report
from tests.support._torch_models import RepVGGBlock, conv_bn, count_convs, rand_bn, rel_error

TOL = 1e-5
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _reasons(report: Report) -> set[Reason]:
    return {d.reason for d in report.declines}


def _fused(model: nn.Module, x: torch.Tensor, policy: str = "flops", **kw):
    model.eval()
    fused, report = convfuse.fuse(model, policy=policy, return_report=True, **kw)
    with torch.no_grad():
        err = rel_error(model(x), fused(x))
    assert err <= TOL, f"relative error {err:.3e}"
    return fused, report


# --------------------------------------------------------------------------- chains
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("length", [2, 3, 4])
def test_conv_chain_with_transparent_layers(nd: int, length: int) -> None:
    torch.manual_seed(nd * 10 + length)
    layers: list[nn.Module] = [_CONV[nd](3, 6, 3, padding=1)]
    for i in range(length - 1):
        layers += [nn.Identity() if i % 2 else nn.Dropout(0.3), _CONV[nd](6, 6, 1, bias=i % 2 == 0)]
    model = nn.Sequential(*layers)
    fused, report = _fused(model, torch.randn(2, 3, *([6] * nd)))
    assert isinstance(fused, nn.Sequential)
    assert count_convs(fused) == 1 and len(fused) == 1
    assert not any(isinstance(m, (nn.Dropout, nn.Identity)) for m in fused.modules())
    assert len(report.merges) == 1 and report.merges[0].group is MergeKind.CHAIN


def test_chain_twin_relu_between() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 1))
    fused, report = _fused(model, torch.randn(2, 3, 6, 6))
    assert count_convs(fused) == 2 and not report.merges


def test_padded_conv_after_spatial_conv_declines() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, padding=1))
    fused, report = _fused(model, torch.randn(2, 3, 8, 8))
    assert count_convs(fused) == 2
    assert _reasons(report) == {Reason.PADDED_AFTER_SPATIAL}


def test_padded_conv_after_spatial_conv_declines_in_fx() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3)
            self.b = nn.Conv2d(6, 6, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(x))

    fused, report = _fused(Net(), torch.randn(2, 3, 8, 8))
    assert count_convs(fused) == 2
    assert [d.reason for d in report.declines] == [Reason.PADDED_AFTER_SPATIAL]
    assert report.declines[0].sources == ("a", "b")


class _StridedDilated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.b = nn.Conv2d(6, 5, 3, dilation=2)

    def forward(self, x):
        return self.b(self.a(x))


def test_unpadded_spatial_chain_merges_in_fx() -> None:
    fused, report = _fused(_StridedDilated(), torch.randn(2, 3, 17, 17), policy="always")
    assert type(fused) is _StridedDilated and count_convs(fused) == 1  # surgery keeps the class (issue 10)
    assert report.merges[0].sources == ("a", "b")


def test_unpadded_spatial_chain_twin_not_profitable() -> None:
    """The merged 11x11 kernel costs more than the two small convs: kept under 'flops'."""
    fused, report = _fused(_StridedDilated(), torch.randn(2, 3, 17, 17))
    assert count_convs(fused) == 2 and _reasons(report) == {Reason.NOT_PROFITABLE}


# --------------------------------------------------------------------------- BatchNorm
def test_conv_then_bn() -> None:
    fused, report = _fused(conv_bn(3, 6, 3, padding=1), torch.randn(2, 3, 7, 7))
    assert count_convs(fused) == 1 and len(fused) == 1
    assert report.merges[0].group is MergeKind.CONV_BN


def test_bn_then_unpadded_conv() -> None:
    model = nn.Sequential(rand_bn(3), nn.Conv2d(3, 6, 3))
    fused, _ = _fused(model, torch.randn(2, 3, 7, 7))
    assert count_convs(fused) == 1 and len(fused) == 1


def test_bn_then_padded_conv_declines() -> None:
    """BN is a pointwise map with a bias; zero padding after it is case 2."""
    model = nn.Sequential(rand_bn(3), nn.Conv2d(3, 6, 3, padding=1))
    fused, report = _fused(model, torch.randn(2, 3, 7, 7))
    assert len(fused) == 2
    assert _reasons(report) == {Reason.PADDED_AFTER_BIASED_POINTWISE}


def test_bn_alone_on_a_branch() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = rand_bn(4)

        def forward(self, x):
            return self.conv(x) + self.bn(x)

    fused, report = _fused(Net(), torch.randn(2, 4, 6, 6))
    assert count_convs(fused) == 1 and report.merges[0].kind == "sum"


def test_training_mode_batchnorm_refused() -> None:
    model = conv_bn(3, 4, 3).train()
    with pytest.raises(TrainingModeError, match=r"call \.eval\(\)"):
        convfuse.fuse(model)


def test_untracked_batchnorm_declines() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    fused, report = convfuse.fuse(model, return_report=True)
    assert len(fused) == 2 and Reason.TRAINING_MODE in _reasons(report)


def test_training_mode_dropout_is_not_transparent() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Conv2d(4, 4, 1)).train()
    fused, report = convfuse.fuse(model, return_report=True)
    assert count_convs(fused) == 2 and Reason.TRAINING_MODE in _reasons(report)


# --------------------------------------------------------------------------- sums
def _branches(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, how: str) -> torch.Tensor:
    if how == "plus":
        return a + b + c
    if how == "torch.add":
        return torch.add(torch.add(a, b), c)
    if how == "operator.add":
        return operator.add(operator.add(a, b), c)
    if how == "Tensor.add":
        return a.add(b).add(c)
    if how == "__add__":
        return a.__add__(b).__add__(c)
    if how == "sum-list":
        return sum([a, b, c])
    if how == "sum-tuple":
        return sum((a, b, c))
    if how == "inplace":
        out = a.clone()
        out += b
        out += c
        return out
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["plus", "torch.add", "operator.add", "Tensor.add", "__add__", "sum-list", "sum-tuple", "inplace"]
)
def test_sum_spellings_merge(how: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = conv_bn(4, 4, 3, padding=1)
            self.b = conv_bn(4, 4, 1)
            self.c = rand_bn(4)

        def forward(self, x):
            return torch.relu(_branches(self.a(x), self.b(x), self.c(x), how))

    torch.manual_seed(1)
    fused, report = _fused(Net(), torch.randn(2, 4, 6, 6))
    assert count_convs(fused) == 1
    assert report.merges[0].kind == "sum"


def test_sub_and_alpha_merge() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(4, 4, (1, 3), padding=(0, 1))

        def forward(self, x):
            return torch.add(self.a(x) - self.b(x), self.c(x), alpha=0.5) - x

    fused, _ = _fused(Net(), torch.randn(2, 4, 6, 6))
    assert count_convs(fused) == 1


def test_sum_twin_branch_with_relu() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.a(x) + torch.relu(self.b(x))

    fused, report = _fused(Net(), torch.randn(2, 4, 6, 6))
    assert count_convs(fused) == 2 and not report.merges


def test_intermediate_used_twice_is_shared_tensor() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3)
            self.b = nn.Conv2d(6, 6, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) * torch.sigmoid(y)

    fused, report = _fused(Net(), torch.randn(2, 3, 8, 8))
    assert count_convs(fused) == 2
    assert _reasons(report) == {Reason.SHARED_TENSOR}
    assert report.declines[0].sources[0] == "a"


def test_sum_of_different_inputs_merges_per_input() -> None:
    """``(a(x) + b(y)) + c(x)``: the two terms of x merge; the term of y stays."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Conv2d(4, 4, 1)
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = conv_bn(4, 4, 1)

        def forward(self, x):
            y = torch.relu(self.pre(x))
            return self.a(x) + self.b(y) + self.c(x)

    torch.manual_seed(2)
    fused, _ = _fused(Net(), torch.randn(2, 4, 6, 6))
    assert count_convs(fused) == 3


def test_avgpool_branch_merges() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.pool = nn.AvgPool2d(3, 1, 1)

        def forward(self, x):
            return self.conv(x) + self.pool(x)

    fused, _ = _fused(Net(), torch.randn(2, 4, 7, 7))
    assert count_convs(fused) == 1
    assert not any(isinstance(m, nn.AvgPool2d) for m in fused.modules())


# --------------------------------------------------------------------------- constants
@pytest.mark.parametrize("shape", [(6, 1, 1), (1, 6, 1, 1), (), (1,)])
@pytest.mark.parametrize("kind", ["buffer", "parameter"])
def test_per_channel_constants_fold(shape: tuple[int, ...], kind: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            scale, shift = torch.randn(shape), torch.randn(shape)
            if kind == "buffer":
                self.register_buffer("scale", scale)
                self.register_buffer("shift", shift)
            else:
                self.scale, self.shift = nn.Parameter(scale), nn.Parameter(shift)

        def forward(self, x):
            return (self.conv(x) * self.scale + self.shift - 0.5) / 2.0

    torch.manual_seed(3)
    fused, report = _fused(Net(), torch.randn(2, 3, 6, 6))
    assert count_convs(fused) == 1
    assert not hasattr(fused, "scale") and not hasattr(fused, "shift")
    code = fused.code
    assert "mul" not in code and " * " not in code and " + " not in code


def test_constant_view_folds() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1)
            self.gamma = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return self.conv(x) * self.gamma.view(1, -1, 1, 1)

    fused, _ = _fused(Net(), torch.randn(2, 3, 5, 5))
    assert count_convs(fused) == 1 and "view" not in fused.code


def test_spatial_constant_twin_is_kept() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 6, 1)
            self.register_buffer("mask", torch.rand(1, 1, 5, 5))

        def forward(self, x):
            return self.b(self.a(x)) * self.mask

    fused, report = _fused(Net(), torch.randn(2, 3, 5, 5))
    assert count_convs(fused) == 1  # a and b merge; the mask multiply stays
    assert Reason.CHANNEL_MISMATCH in _reasons(report)
    assert type(fused) is Net and isinstance(
        fused.mask, torch.Tensor
    )  # merged by surgery: its forward keeps the mask


# --------------------------------------------------------------------------- policy
def test_depthwise_pointwise_kept_under_flops_merged_under_always() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1))
    x = torch.randn(2, 8, 7, 7)
    fused, report = _fused(model, x)
    assert count_convs(fused) == 2 and _reasons(report) == {Reason.NOT_PROFITABLE}
    fused, report = _fused(model, x, policy="always")
    assert count_convs(fused) == 1 and not report.declines


def test_depthwise_pointwise_bn_merges_the_free_part() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1), rand_bn(16))
    fused, report = _fused(model, torch.randn(2, 8, 7, 7))
    assert count_convs(fused) == 2 and len(fused) == 2
    assert [m.group for m in report.merges] == [MergeKind.CONV_BN]


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        convfuse.fuse(nn.Conv2d(1, 1, 1), policy="fastest")


# --------------------------------------------------------------------------- padding layers
def test_zero_pad_folds_into_conv() -> None:
    model = nn.Sequential(
        nn.ZeroPad2d(1),
        nn.ConstantPad2d((0, 0, 1, 1), 0.0),
        nn.Conv2d(3, 4, 1, bias=False),
        nn.Conv2d(4, 4, 3),
    )
    fused, report = _fused(model, torch.randn(2, 3, 6, 6))
    assert len(fused) == 1 and count_convs(fused) == 1 and report.merges
    assert fused[0].padding == (2, 1)


def test_zero_pad_after_spatial_conv_twin() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ZeroPad2d(1), nn.Conv2d(4, 4, 1))
    fused, report = _fused(model, torch.randn(2, 3, 6, 6))
    assert count_convs(fused) == 2 and len(fused) == 2  # the pad folds into the 1x1 only
    assert fused[1].padding == (1, 1)
    assert Reason.PADDED_AFTER_SPATIAL in _reasons(report)


def test_asymmetric_merged_conv_fuses_again_idempotently() -> None:
    """A merge with asymmetric pads is written as Sequential(pad, conv); fusing it again is a
    no-op, and it still merges with what follows."""
    model = nn.Sequential(nn.Conv2d(3, 4, 2, padding="same"), rand_bn(4))
    x = torch.randn(2, 3, 6, 6)
    once, _ = _fused(model, x)
    assert isinstance(once[0], nn.Sequential)  # (ConstantPad2d, Conv2d)
    twice, report = _fused(once, x)
    assert not report.merges  # nothing to do, and the report says why for the conv it kept
    assert [(d.sources, d.reason) for d in report.declines] == [(("0.1",), Reason.NOTHING_TO_MERGE)]
    assert "folds to no fewer layers" in report.declines[0].decline.message
    longer = nn.Sequential(*once, nn.Conv2d(4, 5, 1))
    fused, report = _fused(longer, x)
    assert count_convs(fused) == 1 and report.merges


def test_nonzero_pad_twin() -> None:
    model = nn.Sequential(nn.ConstantPad2d(1, 0.5), nn.Conv2d(3, 4, 3))
    fused, report = _fused(model, torch.randn(2, 3, 6, 6))
    assert len(fused) == 2 and Reason.UNSUPPORTED in _reasons(report)


def test_functional_conv_with_parameters() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(6, 3, 1, 1))
            self.w2 = nn.Parameter(torch.randn(6, 6, 3, 3))
            self.b2 = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return nn.functional.conv2d(nn.functional.conv2d(x, self.w1), self.w2, self.b2, padding=1)

    fused, _ = _fused(Net(), torch.randn(2, 3, 6, 6))
    assert count_convs(fused) == 1 and not hasattr(fused, "w1")


# --------------------------------------------------------------------------- structure and API
def test_nested_sequential_stays_sequential() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), rand_bn(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.Sequential(rand_bn(4), nn.Conv2d(4, 4, 1))),
        nn.ReLU(),
    )
    fused, _ = _fused(model, torch.randn(2, 3, 6, 6))
    assert type(fused) is nn.Sequential and type(fused[0]) is nn.Sequential
    assert count_convs(fused) == 2
    assert isinstance(fused[0][0], nn.Conv2d) and isinstance(fused[0][1], nn.ReLU)


def test_named_sequential_keeps_names() -> None:
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=rand_bn(4), act=nn.ReLU()))
    fused, report = _fused(model, torch.randn(2, 3, 6, 6))
    assert list(fused._modules) == ["conv", "act"]
    assert report.merges[0].target == "conv"


def test_caller_module_untouched() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(RepVGGBlock(4, 4), conv_bn(4, 4, 1)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    modules = [id(m) for m in model.modules()]
    fused = convfuse.fuse(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [id(p) for p in model.parameters()] == params
    assert [id(m) for m in model.modules()] == modules
    fused_params = {id(p) for p in fused.parameters()}
    assert not fused_params & set(params)


def test_fuse_returns_module_or_tuple() -> None:
    model = conv_bn(3, 4, 3).eval()
    assert isinstance(convfuse.fuse(model), nn.Module)
    out = convfuse.fuse(model, return_report=True)
    assert isinstance(out, tuple) and isinstance(out[1], Report)
    fused, report = convfuse.fuse_with_report(model, policy="always")
    assert isinstance(report, Report) and count_convs(fused) == 1
    with pytest.raises(InvalidModelError):
        convfuse.fuse("model.pt")  # type: ignore[arg-type]


def test_report_contents() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(RepVGGBlock(4, 4), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1)).eval()
    x = torch.randn(1, 4, 8, 8)
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)
    assert report.before.op_counts["Conv2d"] == 4 and report.after.op_counts["Conv2d"] == 3
    assert report.before.op_counts["BatchNorm2d"] == 3 and "BatchNorm2d" not in report.after.op_counts
    assert report.after.params == sum(p.numel() for p in fused.parameters())
    assert report.before.params == sum(p.numel() for p in model.parameters())
    assert report.before.macs > report.after.macs > 0
    assert any("relative output error" in n for n in report.notes)
    text = report.to_text()
    assert "merged  sum of branches 1" in text and "not-profitable" in text and "MACs" in text
    data = json.loads(report.to_json())
    assert data["merges"][0]["sources"] == ["0.dense.0", "0.dense.1", "0.one.0", "0.one.1", "0.identity"]
    assert data["declines"][0]["reason"] == "not-profitable"
    assert str(report) == text
    _, quiet = convfuse.fuse(model, return_report=True)
    assert quiet.before.macs is None and quiet.after.macs is None


# --------------------------------------------------------------------------- untraceable modules
class _Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), rand_bn(8), nn.Conv2d(8, 8, 1))
        self.block = RepVGGBlock(8, 8)
        self.other = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.block(self.body(x))
        if y.sum() > 0:
            return self.other(y)
        return -y


def test_untraceable_module_fuses_children_and_reports() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(_Gate(), nn.ReLU()).eval()
    fused, report = _fused(model, torch.randn(2, 3, 6, 6))
    gate = fused[0]
    assert type(gate) is _Gate  # its own forward is kept
    assert count_convs(gate.body) == 1 and count_convs(gate.block) == 1
    assert count_convs(fused) == 3
    (untraced,) = [d for d in report.declines if d.reason is Reason.UNTRACEABLE]
    assert untraced.sources == ("0",) and "_Gate" in untraced.decline.message
    assert any("not traced" in n and "0" in n for n in report.notes)


def test_untraceable_root() -> None:
    torch.manual_seed(8)
    fused, report = _fused(_Gate(), torch.randn(2, 3, 6, 6))
    assert count_convs(fused) == 3
    assert [d.sources for d in report.declines if d.reason is Reason.UNTRACEABLE] == [("_Gate",)]


# --------------------------------------------------------------------------- in-place writes
class _InPlace(nn.Module):
    def __init__(self, mutate_input: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.other = nn.Conv2d(4, 4, 1)
        self.mutate_input = mutate_input

    def forward(self, x):
        x = torch.tanh(x)
        a = self.a(x)
        if self.mutate_input:
            x[:, :1].mul_(0.0)  # the second branch reads the modified tensor
            return a + self.b(x)
        y = torch.relu_(self.other(x))  # an in-place op on something else
        return a + self.b(x), y


def test_inplace_write_to_region_input_declines() -> None:
    fused, report = _fused(_InPlace(mutate_input=True), torch.randn(2, 4, 6, 6))
    assert count_convs(fused) == 3
    assert Reason.UNSUPPORTED in _reasons(report)


def test_inplace_write_elsewhere_does_not_block() -> None:
    model = _InPlace(mutate_input=False).eval()
    x = torch.randn(2, 4, 6, 6)
    fused, report = convfuse.fuse(model, return_report=True)
    for ref, out in zip(model(x), fused(x)):
        assert rel_error(ref, out) <= TOL
    assert count_convs(fused) == 2 and report.merges


def test_named_sequential_lifted_keys_stay_unique() -> None:
    from collections import OrderedDict

    inner = nn.Sequential(OrderedDict(bn=rand_bn(4), conv=nn.Conv2d(4, 4, 3, padding=1), bn2=rand_bn(4)))
    model = nn.Sequential(OrderedDict(x=inner, x_bn=nn.ReLU()))  # lifting inner.bn gives "x_bn"
    fused, _ = _fused(model, torch.randn(2, 4, 6, 6))
    assert list(fused._modules) == ["x_bn", "x_conv", "x_bn_1"]
    assert [type(m) for m in fused] == [nn.BatchNorm2d, nn.Conv2d, nn.ReLU]


def test_example_inputs_pin_channels_layers_cannot() -> None:
    """``x + avgpool(x)`` has no layer that says how many channels x has; shapes do."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AvgPool2d(3, 1, 1)

        def forward(self, x):
            return torch.tanh(x + self.pool(x))

    x = torch.randn(2, 5, 6, 6)
    fused, report = _fused(Net(), x, policy="always")
    assert not report.merges and not report.declines and count_convs(fused) == 0
    fused, report = _fused(Net(), x, example_inputs=x, policy="always")
    assert count_convs(fused) == 1 and report.merges[0].kind == "sum"
    _, report = _fused(Net(), x, example_inputs=x)  # the pool has no parameters, the conv would
    assert _reasons(report) == {Reason.NOT_PROFITABLE}


def test_half_precision_model() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1), rand_bn(8)).eval()
    fused = convfuse.fuse(model.half())
    assert count_convs(fused) == 1 and fused[0].weight.dtype == torch.float16
    x = torch.randn(2, 3, 6, 6)
    ref = model.float()(x)
    assert rel_error(ref, fused.float()(x)) <= 2e-3  # fp16 weights


def test_fused_graph_module_saves_and_loads(tmp_path) -> None:
    """A fused GraphModule pickles (in memory: nothing here loads pickled code from a file) and its
    weights round-trip through torch.save / torch.load(weights_only=True)."""
    torch.manual_seed(10)
    model = RepVGGBlock(4, 4).eval()
    fused = convfuse.fuse(model)
    loaded = pickle.loads(pickle.dumps(fused))
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(loaded(x), fused(x))
    path = tmp_path / "fused_weights.pt"
    torch.save(fused.state_dict(), path)
    fresh = convfuse.fuse(RepVGGBlock(4, 4).eval())
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh(x), fused(x))
