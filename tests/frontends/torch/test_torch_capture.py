"""Issue 16, torch half: the SR block in both forms reaches one conv per block; its twins do not.

Train form: item assignment (``y[:, :, 0:1, :] = b``) stops symbolic tracing; the capture tracer
records it, ``scale * mask`` folds to a constant, the bias-filled border is read as a zero pad
before the 1x1, and the planner merges the five branches. Eval form: ``rep_params()`` (a branch
on ``weight.get_device()``, a kernel filled channel by channel) runs in every forward; it folds to
one stored kernel and bias.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convfuse
from convfuse.decline import Reason
from tests.support.sr_models import SRBlock, SRNet, _randomise_bn, aten_ops, export


def conv_calls(model: nn.Module, x: torch.Tensor) -> int:
    """Convolutions one forward of ``model`` runs (aten level: modules and functional calls)."""
    return aten_ops(model, x)["convolution"]


def _fuse(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, convfuse.Report]:
    fused, report = convfuse.fuse(model, example_inputs=x, return_report=True)
    assert torch.allclose(fused(x), model(x), rtol=1e-5, atol=1e-5)
    return fused, report


def _reasons(report: convfuse.Report) -> set[Reason]:
    return {d.decline.reason for d in report.declines}


@pytest.mark.parametrize("form", ["train", "eval"])
def test_sr_net_one_conv_per_block(form: str) -> None:
    torch.manual_seed(0)
    model = SRNet(8, 2, form=form).eval()
    x = torch.randn(1, 3, 12, 12)
    before = conv_calls(model, x)
    fused, report = _fuse(model, x)
    assert before > 4
    assert conv_calls(fused, x) == 4  # head, one 3x3 per block, tail
    assert "untraceable" not in {d.decline.reason.value for d in report.declines}
    assert any("captured" in n for n in report.notes)
    assert isinstance(fused.body[0][0], SRBlock)  # the class is kept
    y = torch.randn(2, 3, 9, 7)  # another size: nothing was fixed at the traced one
    assert torch.allclose(fused(y), model(y), rtol=1e-5, atol=1e-5)


def test_eval_form_state_dict_loads_and_old_parameters_go() -> None:
    torch.manual_seed(1)
    model = SRNet(8, 1, form="eval").eval()
    x = torch.randn(1, 3, 10, 10)
    fused, report = _fuse(model, x)
    keys = set(fused.state_dict())
    assert not any("branches" in k or "conv3x3" in k for k in keys)
    assert sum(k.startswith("body.0.0.") for k in keys) == 2  # one kernel, one bias
    again = copy.deepcopy(fused)
    again.load_state_dict(fused.state_dict())
    assert torch.equal(again(x), fused(x))
    assert {m.group.value for m in report.merges} == {"constant folded"}


@pytest.mark.parametrize("layer", ["conv", "bn"])
def test_train_block_is_one_conv(layer: str) -> None:
    torch.manual_seed(2)
    block = SRBlock(6, layer=layer).eval()
    _randomise_bn(block)
    x = torch.randn(2, 6, 11, 9)
    fused, report = _fuse(block, x)
    assert conv_calls(block, x) == (9 if layer == "conv" else 5)
    assert conv_calls(fused, x) == 1
    assert sum(m.group.value == "border fill as pad" for m in report.merges) == 4


@pytest.mark.parametrize(
    ("twin", "reason"),
    [
        ({"fill": 0.25}, Reason.BORDER_VALUE),  # a value other than the bias
        ({"sides": ("top", "bottom", "left")}, Reason.BORDER_INCOMPLETE),  # one side left zero
    ],
)
def test_border_twins_do_not_merge(twin: dict, reason: Reason) -> None:
    torch.manual_seed(3)
    block = SRBlock(6, **twin).eval()
    x = torch.randn(1, 6, 10, 10)
    fused, report = _fuse(block, x)
    assert reason in _reasons(report)
    assert conv_calls(fused, x) > 1
    assert not any(m.group.value == "border fill as pad" for m in report.merges)


@pytest.mark.parametrize("form", ["train", "eval"])
def test_cross_check_with_onnx(form: str) -> None:
    """The ONNX half reaches the same conv count on the exported model."""
    torch.manual_seed(4)
    model = SRNet(8, 2, form=form).eval()
    x = torch.randn(1, 3, 12, 12)
    fused, _ = _fuse(model, x)
    onnx_fused, _ = convfuse.fuse_onnx(export(model, (1, 3, 12, 12)))
    assert sum(n.op_type == "Conv" for n in onnx_fused.graph.node) == conv_calls(fused, x) == 4


# --------------------------------------------------------------------------- control flow
class _Branchy(nn.Module):
    """Decides on module state (``scale.sum() > 0``) or, with ``on_shape``, on the input's size."""

    def __init__(self, on_shape: bool = False) -> None:
        super().__init__()
        self.on_shape = on_shape
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = x.shape[-1] > 4 if self.on_shape else self.scale.sum() > 0
        if big:
            return self.bn(self.conv(x))
        return self.conv(x)


def test_state_branch_is_captured_and_merged() -> None:
    model = _Branchy().eval()
    x = torch.randn(1, 4, 8, 8)
    fused, report = _fuse(model, x)
    assert conv_calls(fused, x) == 1
    assert any(m.group.value == "conv+bn" for m in report.merges)


def test_shape_branch_is_not_captured() -> None:
    """A branch on the input's size would be fixed at the traced size: refused."""
    model = _Branchy(on_shape=True).eval()
    x = torch.randn(1, 4, 8, 8)
    fused, report = _fuse(model, x)
    assert not report.merges
    untraceable = [d for d in report.declines if d.decline.reason is Reason.UNTRACEABLE]
    assert untraceable
    small = torch.randn(1, 4, 3, 3)
    assert torch.allclose(fused(small), model(small))
