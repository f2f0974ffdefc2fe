"""Re-parameterisable block styles through ``convfuse.fuse``: each merges to the expected number
of convs with equal outputs, and each has a negative twin that must not merge (with its reason)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convfuse
from convfuse import Reason
from convfuse.border_map import border_merges
from convfuse.errors import TrainingModeError
from convfuse.frontends.torch.ring import BorderConv
from tests.support._torch_models import (
    STYLES,
    ACNetBlock,
    DBBBlock,
    ExpandedConv,
    MobileOneBlock,
    RepVGGBlock,
    SESRBlock,
    count_convs,
    rand_bn,
    rel_error,
)

FP32_TOL = 1e-5


def _reasons(report) -> set[Reason]:
    return {d.reason for d in report.declines}


def _check(model: nn.Module, x: torch.Tensor, policy: str = "flops"):
    """Fuse ``model``; assert outputs equal within fp32 tolerance; return (fused, report)."""
    model.eval()
    fused, report = convfuse.fuse(model, policy=policy, return_report=True)
    with torch.no_grad():
        err = rel_error(model(x), fused(x))
    assert err <= FP32_TOL, f"relative error {err:.3e}"
    return fused, report


# --------------------------------------------------------------------------- positives
@pytest.mark.parametrize("style", sorted(STYLES))
def test_style_merges_to_expected_convs(style: str) -> None:
    torch.manual_seed(0)
    make, c_in, before, after = STYLES[style]
    model = make().eval()
    assert count_convs(model) == before
    fused, report = _check(model, torch.randn(2, c_in, 17, 15))
    assert count_convs(fused) == after
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert report.merges and report.after.params < report.before.params


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_repvgg_any_rank(nd: int) -> None:
    torch.manual_seed(1)
    block = RepVGGBlock(4, 4, nd=nd)
    x = torch.randn(2, 4, *([7] * nd))
    fused, report = _check(block, x)
    assert count_convs(fused) == 1
    (merge,) = report.merges
    assert merge.kind == "sum" and len(merge.sources) == 5


def test_repvgg_stride_two_without_identity() -> None:
    torch.manual_seed(2)
    fused, _ = _check(RepVGGBlock(4, 6, stride=2), torch.randn(1, 4, 10, 9))
    assert count_convs(fused) == 1


def test_dbb_avg_branch_merges_although_dear_alone() -> None:
    """1x1 -> avg pool is dearer as one conv, but free inside the kxk sum."""
    torch.manual_seed(3)
    fused, report = _check(DBBBlock(4, 4), torch.randn(2, 4, 9, 9))
    assert count_convs(fused) == 1
    assert Reason.NOT_PROFITABLE not in _reasons(report)


def test_sesr_block_collapses_with_residual() -> None:
    torch.manual_seed(4)
    fused, report = _check(SESRBlock(4, 16), torch.randn(2, 4, 8, 8))
    assert count_convs(fused) == 1
    assert report.merges[0].kind == "sum"


def test_expanded_conv_is_one_conv() -> None:
    torch.manual_seed(5)
    fused, report = _check(ExpandedConv(4, 6, k=3, r=4), torch.randn(2, 4, 8, 8))
    assert count_convs(fused) == 1
    assert "padding case 1" in report.merges[0].note


# --------------------------------------------------------------------------- negative twins
def test_repvgg_twin_branch_output_used_twice() -> None:
    class Leaky(RepVGGBlock):
        def forward(self, x):
            dense = self.dense(x)
            return self.act(dense + self.one(x) + self.identity(x)), dense

    torch.manual_seed(6)
    block = Leaky(4, 4).eval()
    x = torch.randn(2, 4, 8, 8)
    fused, report = convfuse.fuse(block, return_report=True)
    for a, b in zip(block(x), fused(x)):
        assert rel_error(a, b) <= FP32_TOL
    assert Reason.GRAPH_OUTPUT in _reasons(report)
    assert count_convs(fused) == 2  # dense conv+BN kept apart; the 1x1 and BN identity merge


def test_repvgg_twin_training_mode_refused() -> None:
    block = RepVGGBlock(4, 4).train()
    with pytest.raises(TrainingModeError, match=r"\.eval\(\)"):
        convfuse.fuse(block)


def test_acnet_twin_mixed_padding_modes() -> None:
    torch.manual_seed(7)
    fused, report = _check(ACNetBlock(4, 4, mode="reflect"), torch.randn(2, 4, 9, 9))
    assert Reason.MIXED_PADDING_MODES in _reasons(report)
    assert count_convs(fused) == 2  # square + vertical merge, reflect-padded horizontal stays


def test_dbb_twin_padding_after_bn() -> None:
    """DBB with the padding on the kxk after 1x1+BN: the border would see BN(bias), not zero."""
    torch.manual_seed(8)
    with border_merges(False):
        fused, report = _check(DBBBlock(4, 4, pad_late=True), torch.randn(2, 4, 9, 9))
    assert Reason.PADDED_AFTER_BIASED_POINTWISE in _reasons(report)
    assert count_convs(fused) == 3  # 1x1 -> kxk branch stays two convs, the rest is one
    torch.manual_seed(8)
    fused, report = _check(DBBBlock(4, 4, pad_late=True), torch.randn(2, 4, 9, 9))  # issue 14
    assert count_convs(fused) == 1 and any(isinstance(m, BorderConv) for m in fused.modules())


def test_dbb_twin_avgpool_without_count_include_pad() -> None:
    torch.manual_seed(9)
    block = DBBBlock(4, 4)
    block.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    block.avg_1x1 = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), rand_bn(4))
    fused, report = _check(block, torch.randn(2, 4, 9, 9))
    assert Reason.UNSUPPORTED in _reasons(report)
    assert count_convs(fused) == 2


def test_mobileone_twin_dense_scale_branch_not_profitable() -> None:
    """A dense 1x1 scale branch next to depthwise kxk branches would make the merge dense."""
    torch.manual_seed(10)
    block = MobileOneBlock(8, 8, 3, groups=8, scale_groups=1)
    fused, report = _check(block, torch.randn(2, 8, 9, 9))
    assert Reason.NOT_PROFITABLE in _reasons(report)
    assert count_convs(fused) == 2
    fused_always, _ = _check(block, torch.randn(2, 8, 9, 9), policy="always")
    assert count_convs(fused_always) == 1


def test_expanded_conv_twin_first_bias() -> None:
    torch.manual_seed(11)
    with border_merges(False):
        fused, report = _check(ExpandedConv(4, 4, first_bias=True), torch.randn(2, 4, 8, 8))
    assert Reason.PADDED_AFTER_BIASED_POINTWISE in _reasons(report)
    assert count_convs(fused) == 2  # spatial + project merge; the biased 1x1 stays
    fused, report = _check(ExpandedConv(4, 4, first_bias=True), torch.randn(2, 4, 8, 8))  # issue 14
    assert count_convs(fused) == 1 and "padding case 2" in report.merges[0].note


def test_sesr_twin_activation_inside() -> None:
    torch.manual_seed(12)
    fused, report = _check(SESRBlock(4, 16, act_inside=True), torch.randn(2, 4, 8, 8))
    assert count_convs(fused) == 2
    assert not report.merges
