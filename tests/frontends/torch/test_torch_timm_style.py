"""Blocks written the way timm writes them, through ``convfuse.fuse``.

The models below are faithful copies (standard torch only) of timm's ``BatchNormAct2d``
(a BatchNorm2d subclass whose own forward asserts the rank, calls ``F.batch_norm`` and then
``drop``/``act``), ``ConvNormAct``, ``RepVggBlock`` (``x += identity``) and ``MobileOneBlock``
(``identity_out = 0`` defaults, ``out += ck(x)`` over a ModuleList). Each positive test checks
conv counts and outputs (fp32 and float64); each has a negative twin that must not merge, with
the reason it reports.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import convfuse
from convfuse import Reason
from convfuse.errors import TrainingModeError
from convfuse.frontends.torch.surgery import generated_code
from convfuse.report import MergeKind
from tests.support._torch_models import randomize_bn
from tests.support.helpers import rel_err

FP32_TOL = 1e-5
FP64_TOL = 1e-10

# ``len(x.shape)`` in this module's forwards is recorded by torch.fx rather than refused.
fx.wrap("len")


# --------------------------------------------------------------------------- timm-style layers
class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: BN (own forward via F.batch_norm), drop, act."""

    def __init__(
        self, num_features: int, apply_act: bool = True, act_layer: type[nn.Module] = nn.ReLU
    ) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class ConvNormAct(nn.Module):
    """timm.layers.conv_bn_act.ConvNormAct: conv (no bias), BatchNormAct2d, aa (Identity)."""

    def __init__(
        self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, apply_act: bool = True
    ):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=(k - 1) // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(c_out, apply_act=apply_act)
        self.aa = nn.Identity()

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        x = self.aa(x)
        return x


class RepVggBlock(nn.Module):
    """timm.models.byobnet.RepVggBlock (train-time form)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        use_ident = c_in == c_out and stride == 1
        self.identity = BatchNormAct2d(c_out, apply_act=False) if use_ident else None
        self.conv_kxk = ConvNormAct(c_in, c_out, 3, stride, groups, apply_act=False)
        self.conv_1x1 = ConvNormAct(c_in, c_out, 1, stride, groups, apply_act=False)
        self.attn = nn.Identity()
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        x = self.attn(x)
        return self.act(x)


class MobileOneBlock(nn.Module):
    """timm.models.byobnet.MobileOneBlock (train-time form): identity BN, 1x1 scale branch
    (kernel > 1), ``num_conv_branches`` kxk branches summed with ``out += ck(x)``."""

    def __init__(
        self, c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, num_conv_branches: int = 1
    ) -> None:
        super().__init__()
        use_ident = c_in == c_out and stride == 1
        self.num_conv_branches = num_conv_branches
        self.reparam_conv = None
        self.identity = BatchNormAct2d(c_out, apply_act=False) if use_ident else None
        self.conv_kxk = nn.ModuleList(
            [ConvNormAct(c_in, c_out, k, stride, groups, apply_act=False) for _ in range(num_conv_branches)]
        )
        self.conv_scale = ConvNormAct(c_in, c_out, 1, stride, groups, apply_act=False) if k > 1 else None
        self.attn = nn.Identity()
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for ck in self.conv_kxk:
            out += ck(x)
        out = self.drop_path(out)
        out = self.attn(out)
        return self.act(out)


class _Net(nn.Module):
    """A small timm-style network: ConvNormAct stem, RepVGG and MobileOne stages, 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, stride=2)
        self.stages = nn.Sequential(
            RepVggBlock(8, 16, stride=2),
            RepVggBlock(16, 16),
            MobileOneBlock(16, 16, 3, groups=16, num_conv_branches=2),  # depthwise
            MobileOneBlock(16, 24, 1, num_conv_branches=2),  # pointwise, no identity: ``0 + 0 + ck(x)``
        )
        self.final_conv = ConvNormAct(24, 32, 1)

    def forward(self, x):
        return self.final_conv(self.stages(self.stem(x))).mean((2, 3))


# --------------------------------------------------------------------------- helpers
def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def _code(model: nn.Module) -> str:
    # GraphModules and the forwards convfuse generates on a module's own class (issue 10)
    return "\n".join(m.code for m in model.modules() if isinstance(m, fx.GraphModule) or generated_code(m))


def _check(make, x: torch.Tensor, after: int):
    """Fuse a fresh eval-mode model in fp32 and float64; outputs equal, ``after`` convs left.
    Returns the fp32 model, its fused form and the report."""
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    fused, report = convfuse.fuse(model, return_report=True)
    with torch.no_grad():
        err = rel_err(model(x), fused(x))
    assert err <= FP32_TOL, f"fp32 relative error {err:.2e}\n{report.to_text()}"
    assert _convs(fused) == after, report.to_text()
    assert "batch_norm" not in _code(fused), _code(fused)
    model64 = model.double()
    fused64 = convfuse.fuse(model64)
    with torch.no_grad():
        err64 = rel_err(model64(x.double()), fused64(x.double()))
    assert err64 <= FP64_TOL, f"float64 relative error {err64:.2e}"
    assert _convs(fused64) == after
    return model.float(), fused, report


def _assert_targets_exist(fused: nn.Module, report) -> None:
    """Every merge names the conv it wrote by its path in the fused model."""
    for m in report.merges:
        if m.target != "(removed)":
            written = fused.get_submodule(m.target)
            assert isinstance(written, (nn.Conv2d, nn.Sequential)), (m.target, type(written))


# --------------------------------------------------------------------------- positives
@pytest.mark.parametrize(("c_in", "c_out", "stride"), [(8, 8, 1), (4, 8, 2), (8, 8, 2)])
def test_repvgg_block_merges_to_one_conv(c_in: int, c_out: int, stride: int) -> None:
    model, fused, report = _check(
        lambda: RepVggBlock(c_in, c_out, stride), torch.randn(2, c_in, 9, 10), after=1
    )
    assert _convs(model) == 2
    assert len(report.merges) == 1 and report.merges[0].kind in ("sum", "sum+chain")
    assert not report.declines, report.to_text()
    assert "conv_1x1.bn:batch_norm" in " ".join(report.merges[0].sources)  # named by the module it runs in


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "stride", "groups", "branches"),
    [
        (8, 8, 3, 1, 1, 3),  # identity + scale + 3 kxk branches
        (8, 8, 3, 1, 8, 2),  # depthwise (MobileOne's kxk stage)
        (8, 16, 3, 2, 1, 2),  # no identity: ``scale + 0``
        (8, 8, 1, 1, 1, 2),  # pointwise with identity, no scale: ``0 + identity``
        (8, 12, 1, 1, 1, 2),  # pointwise, nothing but kxk branches: ``0 + 0 + ck(x)``
    ],
)
def test_mobileone_block_merges_to_one_conv(c_in, c_out, k, stride, groups, branches) -> None:
    make = lambda: MobileOneBlock(c_in, c_out, k, stride, groups, branches)  # noqa: E731
    model, fused, report = _check(make, torch.randn(2, c_in, 9, 10), after=1)
    assert _convs(model) == branches + (k > 1)
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.groups == groups and conv.kernel_size == (k, k)
    assert not report.declines, report.to_text()


def test_convnormact_with_act_merges_conv_and_bn_keeps_relu() -> None:
    model, fused, report = _check(lambda: ConvNormAct(4, 8, 3), torch.randn(2, 4, 7, 7), after=1)
    assert [m.group for m in report.merges] == [MergeKind.CONV_BN]
    assert any(isinstance(m, nn.ReLU) for m in fused.modules())
    assert report.merges[0].target == "fused"


def test_timm_style_network() -> None:
    model, fused, report = _check(_Net, torch.randn(2, 3, 16, 16), after=6)
    assert _convs(model) == 1 + 2 + 2 + (2 + 1) + 2 + 1  # stem, RepVGG x2, MobileOne dw, pw, head
    assert report.after.params < report.before.params
    assert not report.declines, report.to_text()
    _assert_targets_exist(fused, report)


def test_sequential_of_conv_and_batchnormact_merges_across_children() -> None:
    """DenseNet-style ``Sequential(conv0, norm0=BatchNormAct2d)``: the run of a known conv and
    a BN subclass with its own forward is traced as one graph, so they merge; the Sequential
    stays a Sequential."""
    from collections import OrderedDict

    make = lambda: nn.Sequential(  # noqa: E731
        OrderedDict(
            conv0=nn.Conv2d(3, 8, 3, padding=1, bias=False), norm0=BatchNormAct2d(8), pool0=nn.MaxPool2d(2)
        )
    )
    _, fused, report = _check(make, torch.randn(2, 3, 8, 8), after=1)
    assert isinstance(fused, nn.Sequential) and list(fused._modules) == ["conv0", "pool0"]
    assert [m.sources for m in report.merges] == [("conv0", "norm0:batch_norm", "norm0.drop")]
    assert not report.declines, report.to_text()
    _assert_targets_exist(fused, report)


def test_sequential_act_between_conv_and_next_conv_twin() -> None:
    """The twin: BatchNormAct2d *with* its ReLU between two convs. conv+BN merge, the 1x1 after
    the ReLU stays, and its line names the layer before it."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), BatchNormAct2d(8), nn.Conv2d(8, 8, 1))

    _, fused, report = _check(make, torch.randn(2, 3, 8, 8), after=2)
    assert [m.group for m in report.merges] == [MergeKind.CONV_BN]
    (line,) = report.declines
    assert line.sources == ("2",) and line.reason is Reason.NOTHING_TO_MERGE, report.to_text()
    assert "1.act (ReLU)" in line.decline.message
    _assert_targets_exist(fused, report)


def test_batchnorm_subclass_keeping_the_base_forward_is_one_layer() -> None:
    """A BatchNorm subclass without its own forward is a BatchNorm: kept whole when tracing
    (tracing into ``_BatchNorm.forward`` would hit its rank check's control flow)."""

    class PlainSubclass(nn.BatchNorm2d):
        pass

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = PlainSubclass(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    _, fused, report = _check(Block, torch.randn(2, 3, 6, 6), after=1)
    assert report.merges[0].sources == ("conv", "bn")


@pytest.mark.parametrize("read", ["ndim", "dim()", "len(shape)", "len(size())"])
def test_rank_reads_do_not_block_a_merge(read: str) -> None:
    class RankChecked(nn.BatchNorm2d):
        def forward(self, x):
            rank = {"ndim": lambda: x.ndim, "dim()": lambda: x.dim(), "len(shape)": lambda: len(x.shape),
                    "len(size())": lambda: len(x.size())}[read]()  # fmt: skip
            torch._assert(rank == 4, "expected a 4D input")
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
            )

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = RankChecked(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    _, fused, report = _check(Block, torch.randn(2, 3, 6, 6), after=1)
    assert "_assert" in fused.code  # the check stays, on a tensor of the same rank
    with pytest.raises(Exception, match="expected a 4D input"):
        fused(torch.randn(3, 6, 6))


# --------------------------------------------------------------------------- in-place sums
class _InPlaceBranches(nn.Module):
    """MobileOne written with ``Tensor.add_``: in place on a sum nothing else has read."""

    def __init__(self) -> None:
        super().__init__()
        self.identity = BatchNormAct2d(8, apply_act=False)
        self.scale = ConvNormAct(8, 8, 1, apply_act=False)
        self.kxk = nn.ModuleList([ConvNormAct(8, 8, 3, apply_act=False) for _ in range(2)])

    def forward(self, x):
        out = self.scale(x) + self.identity(x)
        for ck in self.kxk:
            out.add_(ck(x))
        return torch.relu(out)


def test_inplace_add_on_a_fresh_sum_merges() -> None:
    _, fused, _ = _check(_InPlaceBranches, torch.randn(2, 8, 7, 7), after=1)
    assert "add_" not in fused.code


class _InPlaceAfterRead(nn.Module):
    """``t.add_(...)`` after ``t`` was read by another layer: the write must stay in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        t = self.a(x)
        u = self.d(t)
        t.add_(self.b(x))
        return t, u


def test_inplace_add_after_another_read_twin() -> None:
    torch.manual_seed(1)
    model = _InPlaceAfterRead().eval()
    x = torch.randn(2, 4, 6, 6)
    fused, report = convfuse.fuse(model, return_report=True)
    for ref, out in zip(model(x), fused(x)):
        assert rel_err(ref, out) <= FP32_TOL
    assert _convs(fused) == 3
    by_layer = {s: d for d in report.declines for s in d.sources}
    assert {"a", "b", "d"} <= set(by_layer), report.to_text()
    assert "in-place write" in by_layer["b"].decline.message


# --------------------------------------------------------------------------- negative twins
def test_train_mode_raises() -> None:
    for make in (lambda: RepVggBlock(4, 4), lambda: MobileOneBlock(4, 4, num_conv_branches=2), _Net):
        with pytest.raises(TrainingModeError, match=r"\.eval\(\)"):
            convfuse.fuse(make().train())


def test_batchnorm_subclass_in_train_mode_raises() -> None:
    block = ConvNormAct(3, 4, 3).eval()
    block.bn.train()
    with pytest.raises(TrainingModeError, match="BatchNormAct2d at 'bn'"):
        convfuse.fuse(block)


def test_functional_batch_norm_in_training_declines() -> None:
    """``F.batch_norm(..., training=True)`` on a module's own buffers (no BatchNorm layer):
    a typed decline with the ``.eval()`` hint, and nothing merged across it."""

    class BatchStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, None, None, True, 0.0, 1e-5)

    model = BatchStats().eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = convfuse.fuse(model, return_report=True)
    assert _convs(fused) == 1 and torch.allclose(model(x), fused(x))
    (bn,) = [d for d in report.declines if d.reason is Reason.TRAINING_MODE]
    assert bn.sources == ("batch_norm",) and ".eval()" in bn.decline.message


class _FunctionalBN(nn.Module):
    """Conv then batch norm called as a function on the module's own buffers."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.randn(4))
        self.beta = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = self.conv(x)
        if self.form == "torch.batch_norm":
            return torch.batch_norm(y, self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-3, False)
        if self.form == "computed statistics":  # the variance of this batch: not a constant
            return F.batch_norm(
                y, self.mean, y.detach().var((0, 2, 3)), self.gamma, self.beta, False, 0.1, 1e-3
            )
        return F.batch_norm(y, self.mean, self.var, None, None, eps=1e-3)  # training defaults to False


@pytest.mark.parametrize("form", ["F.batch_norm", "torch.batch_norm"])
def test_functional_batch_norm_forms_merge(form: str) -> None:
    _, _, report = _check(lambda: _FunctionalBN(form), torch.randn(2, 3, 6, 6), after=1)
    assert [m.group for m in report.merges] == [MergeKind.CONV_BN]


def test_functional_batch_norm_with_computed_statistics_twin() -> None:
    torch.manual_seed(3)
    model = _FunctionalBN("computed statistics").eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = convfuse.fuse(model, return_report=True)
    assert _convs(fused) == 1 and rel_err(model(x), fused(x)) == 0.0 and not report.merges
    reasons = {d.reason for d in report.declines}
    assert Reason.NON_CONSTANT in reasons, report.to_text()
    assert any("running_var" in d.decline.message for d in report.declines)


def test_batchnormact_without_running_stats_twin() -> None:
    """``track_running_stats=False``: batch statistics even in eval mode, so nothing folds."""
    torch.manual_seed(4)
    block = ConvNormAct(3, 4, 3, apply_act=False)
    block.bn = BatchNormAct2d(4, apply_act=False)
    block.bn.track_running_stats = False
    block.bn.running_mean = block.bn.running_var = None
    block.eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = convfuse.fuse(block, return_report=True)
    assert _convs(fused) == 1 and not report.merges and rel_err(block(x), fused(x)) == 0.0
    (line,) = [d for d in report.declines if d.reason is Reason.TRAINING_MODE]
    assert "track_running_stats=False" in line.decline.message


class _ActBeforeSum(nn.Module):
    """RepVGG-like sum whose branches end in BatchNormAct2d *with* ReLU: conv+BN merge per
    branch, the sum of two ReLU outputs is not linear in x and stays."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_kxk = ConvNormAct(8, 8, 3, apply_act=True)
        self.conv_1x1 = ConvNormAct(8, 8, 1, apply_act=True)

    def forward(self, x):
        x = self.conv_1x1(x) + self.conv_kxk(x)
        return x


def test_act_inside_bn_blocks_the_sum() -> None:
    model, fused, report = _check(_ActBeforeSum, torch.randn(2, 8, 7, 7), after=2)
    assert [m.group for m in report.merges] == [MergeKind.CONV_BN, MergeKind.CONV_BN]
    assert sum(isinstance(m, nn.ReLU) for m in fused.modules()) == 2


class _ShapeChecked(nn.BatchNorm2d):
    """Asserts the channel count: reads ``x.shape``, which the merged region cannot keep."""

    def forward(self, x):
        torch._assert(x.shape[1] == self.num_features, "wrong channel count")
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )


def test_shape_read_that_cannot_move_declines() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = _ShapeChecked(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    torch.manual_seed(2)
    model = randomize_bn(Block()).eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = convfuse.fuse(model, return_report=True)
    assert _convs(fused) == 1 and rel_err(model(x), fused(x)) == 0.0
    assert not report.merges
    (line,) = report.declines
    assert line.sources == ("conv",) and line.reason is Reason.SHARED_TENSOR
    assert "bn:getattr" in line.decline.message and ".shape" in line.decline.message


# --------------------------------------------------------------------------- reporting
class Conv2dSame(nn.Conv2d):
    """timm.layers.conv2d_same.Conv2dSame: TF 'SAME' padding computed from the input size."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = max(
            (math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0
        )
        pad_w = max(
            (math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0
        )
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


def test_dynamic_same_padding_conv_is_reported_untraceable() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = Conv2dSame(3, 4, 3, stride=2, bias=False)
            self.bn = BatchNormAct2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    model = randomize_bn(Block()).eval()
    x = torch.randn(2, 3, 7, 7)
    fused, report = convfuse.fuse(model, return_report=True)
    assert _convs(fused) == 1 and rel_err(model(x), fused(x)) == 0.0
    lines = {d.sources: d for d in report.declines}
    assert lines[("Block",)].reason is Reason.UNTRACEABLE
    assert "in conv (Conv2dSame)" in lines[("Block",)].decline.message
    assert lines[("conv",)].reason is Reason.UNTRACEABLE and "Conv2dSame" in lines[("conv",)].decline.message


def test_static_forward_conv_subclass_is_traced_through_and_merges() -> None:
    """A Conv2d subclass with its own (static) forward is read through its F.conv2d call."""

    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return (
                F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
                * 0.5
            )

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = ScaledConv(3, 4, 3, padding=1)
            self.bn = BatchNormAct2d(4, apply_act=False)

        def forward(self, x):
            return self.bn(self.conv(x))

    _, fused, report = _check(Block, torch.randn(2, 3, 6, 6), after=1)
    assert report.merges[0].sources[0] == "conv:conv2d"


def test_every_unmerged_conv_gets_a_line() -> None:
    """Nothing merges (a non-linear op after every conv): each conv is named with the reason."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return torch.sigmoid(self.b(torch.tanh(self.a(x))))

    fused, report = convfuse.fuse(Net().eval(), return_report=True)
    assert not report.merges and _convs(fused) == 2
    lines = {d.sources: d for d in report.declines}
    assert set(lines) == {("a",), ("b",)}
    assert all(d.reason is Reason.NOTHING_TO_MERGE for d in lines.values())
    assert "torch.tanh" in lines[("a",)].decline.message and "torch.sigmoid" in lines[("b",)].decline.message
    assert "no linear runs found" not in report.to_text()


def test_unmerged_convs_in_sequential_and_declined_layers_get_lines() -> None:
    # A ConvTranspose2d then a 3x3 conv: issue 12 reads the transposed conv, and the pair is
    # declined with its reason (the 1x1 twin merges, tests/planner/test_transpose_planner.py).
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 4, 2), nn.Conv2d(4, 4, 3)
    ).eval()
    _, report = convfuse.fuse(model, return_report=True)
    lines = {d.sources: d for d in report.declines}
    assert (
        lines[("0",)].reason is Reason.NOTHING_TO_MERGE and "before 1 (ReLU)" in lines[("0",)].decline.message
    )
    assert (
        lines[("2", "3")].reason is Reason.NOT_POINTWISE
        and "kernel (3, 3)" in lines[("2", "3")].decline.message
    )
    assert not report.merges


def test_a_transposed_conv_subclass_with_its_own_forward_is_traced_into() -> None:
    class OwnForward(nn.ConvTranspose2d):  # its own forward: not assumed to be its base class
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x) * torch.sigmoid(x.mean())

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), OwnForward(4, 4, 2), nn.Conv2d(4, 4, 1)).eval()
    _, report = convfuse.fuse(model, return_report=True)
    lines = {d.sources: d for d in report.declines}
    inner = lines[("2:conv_transpose2d",)]  # the F.conv_transpose2d call inside its forward
    assert inner.reason is Reason.NOTHING_TO_MERGE and "operator.mul" in inner.decline.message
    assert not report.merges
