"""``convfuse.fuse`` never hands back a broken module (issue 10).

Models are written the way public model code writes them (``tests/support/public_style_models.py``):
routing parents, attribute writes in forward, explicit ``F.pad``, heads that build grids from
``x.shape``. Each positive test has a negative twin: a case that must not merge, or must be
put back, and still runs and matches.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import convfuse
from convfuse import Reason
from convfuse.errors import ConvfuseError, InternalError, TorchFxError
from convfuse.frontends.torch import export as torch_export
from convfuse.frontends.torch import regions as torch_regions
from convfuse.frontends.torch import surgery as torch_surgery
from convfuse.frontends.torch.check import (
    candidate_inputs,
    derived_spatial_sizes,
    example_spatial_size,
    infer_example_input,
)
from convfuse.frontends.torch.surgery import FoldedBatchNorm, generated_code, original_class
from tests.support._torch_models import RepVGGBlock, conv_bn, rand_bn, randomize_bn
from tests.support.helpers import rel_err
from tests.support.public_style_models import DetectionModel, RoutingParent, SRNet, TrainBlock

FP32 = 1e-5


def _counts(model: nn.Module) -> tuple[int, int]:
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return convs, bns


def _out(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


def _reasons(report) -> set[Reason]:
    return {d.reason for d in report.declines}


# --------------------------------------------------------------------------- YOLO style
def _detector() -> DetectionModel:
    torch.manual_seed(0)
    return randomize_bn(DetectionModel()).eval()


def test_yolo_style_model_runs_matches_and_keeps_its_attributes() -> None:
    model = _detector()
    fused, report = convfuse.fuse(model, return_report=True)
    x = torch.randn(2, 3, 64, 64)
    (ref, ref_levels), (out, out_levels) = _out(model, x), _out(fused, x)
    assert rel_err(ref, out) <= FP32 and all(rel_err(a, b) <= FP32 for a, b in zip(ref_levels, out_levels))
    assert _counts(fused)[1] == 0 and _counts(model)[1] > 0, report.to_text()  # BN gone
    assert _counts(fused)[0] == _counts(model)[0] - 1  # the RepConv's two branches became one
    assert type(fused) is DetectionModel and fused.names == model.names and fused.yaml == model.yaml
    assert torch.equal(fused.stride, model.stride) and fused.save == model.save
    for a, b in zip(model.model, fused.model):  # every layer keeps its class and routing attributes
        assert original_class(b) is type(a) and (b.f, b.i, b.type) == (a.f, a.i, a.type)
    assert fused.model[4].g == model.model[4].g and generated_code(fused.model[4])  # RepConv: new forward
    assert generated_code(fused.model[3]) is None  # Conv: surgery, its own forward
    assert fused.is_fused() and fused.info().startswith("14 layers")  # the model's own methods
    assert any(
        n.startswith("self-check: fused and original agree on an inferred input") for n in report.notes
    )


def test_yolo_style_routing_over_plain_layers_twin_never_merges_across_children() -> None:
    """The twin: the routed Sequential holds a plain conv and its BN as separate children and a
    later layer reads the conv's own output (``f = 0``): merging them across the children would
    change what that layer reads, so they stay; the layers inside each child still merge."""

    torch.manual_seed(1)
    layers = [nn.Conv2d(3, 4, 3, padding=1), rand_bn(4), nn.Sequential(nn.Conv2d(4, 4, 1), rand_bn(4))]
    model = RoutingParent(layers, [-1, -1, 0], channels=4).eval()  # shape check: fx cannot trace it
    x = torch.randn(2, 3, 8, 8)
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32
    assert len(fused.model) == 3 and isinstance(fused.model[1], nn.BatchNorm2d)  # not merged across
    assert _counts(fused.model[2]) == (1, 0)  # a Sequential its parent calls whole: merged inside
    assert [m.f for m in fused.model] == [-1, -1, 0]
    assert any("one by one" in n for n in report.notes + [d.decline.message for d in report.declines])


def test_yolo_style_models_own_fuse_still_works_after_convfuse() -> None:
    """The model's own BN-folding ``fuse()`` (``m.conv = fuse_conv_and_bn(m.conv, m.bn)``) runs on
    the fused model: each folded BN reads as an identity BN, so it folds nothing more."""
    model = _detector()
    fused = convfuse.fuse(model)
    x = torch.randn(1, 3, 32, 32)
    ref = _out(model, x)[0]
    with torch.no_grad():
        again = fused.fuse()
    assert again is fused and rel_err(ref, _out(fused, x)[0]) <= FP32
    assert not any(hasattr(m, "bn") for m in fused.model if type(m).__name__ == "Conv")


def test_yolo_style_model_fused_by_its_own_method_twin_has_nothing_left_to_fold() -> None:
    """The twin: a model already folded by its own ``fuse()`` has no BN left; convfuse merges
    only the RepConv branches and the result still runs and matches."""
    model = _detector()
    with torch.no_grad():
        model.fuse()
    fused, report = convfuse.fuse(model, return_report=True)
    x = torch.randn(1, 3, 32, 32)
    assert rel_err(_out(model, x)[0], _out(fused, x)[0]) <= FP32
    assert {m.kind for m in report.merges} == {"sum"}


# --------------------------------------------------------------------------- SR style
def test_sr_style_model_with_attribute_writing_forward_runs_and_each_block_is_one_conv() -> None:
    torch.manual_seed(2)
    model = SRNet(num_block=3).eval()
    x = torch.rand(2, 3, 10, 12)
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)  # issue: raised from fx lint
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32
    assert isinstance(fused.mean, torch.Tensor) and isinstance(model.mean, torch.Tensor)  # never a Proxy
    assert type(fused) is SRNet and generated_code(fused) is None  # the forward with the write is kept
    for block in fused.body:
        assert original_class(block) is TrainBlock and _counts(block)[0] == 1
    assert _counts(fused)[0] == _counts(model)[0] - 3 * 3
    assert fused.flops_hint(4, 4) == model.flops_hint(4, 4)
    fused.mean = fused.mean.double()
    fused(x)  # the kept forward still makes its write
    assert fused.mean.dtype == torch.float32
    kept = [d for d in report.declines if "writes attributes" in d.decline.message]
    assert kept and "SRNet assigns mean" in kept[0].decline.message


def test_sr_style_reflect_padding_twin_keeps_the_blocks() -> None:
    """The twin: reflect padding in front of the 1x1 is not zero padding, so the padded branch
    and the skip are never summed into one conv; only the unpadded 1x1 -> 3x3 -> 1x1 chain
    after the pad merges, by surgery (the block's forward, with its reflect pad, is kept)."""
    torch.manual_seed(3)
    model = SRNet(num_block=2, pad_mode="reflect").eval()
    x = torch.rand(2, 3, 8, 8)
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32
    for block in fused.body:
        assert type(block) is TrainBlock and generated_code(block) is None and _counts(block)[0] == 2
    assert not any(m.kind == "sum" for m in report.merges)


# --------------------------------------------------------------------------- control flow in one child
class _Gated(nn.Module):
    """Data-dependent control flow between its two convs: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.threshold = 0.0

    def forward(self, x):
        y = self.a(x)
        if y.mean() > self.threshold:
            y = self.b(y)
        return y


class _WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 4, 3, padding=1)
        self.gate = _Gated()
        self.head = RepVGGBlock(4, 4)

    def forward(self, x):
        return self.head(self.gate(self.stem(x)))


def test_data_dependent_control_flow_in_one_child_fuses_the_others() -> None:
    torch.manual_seed(4)
    model = _WithGate().eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32
    assert type(fused) is _WithGate and type(fused.gate) is _Gated and fused.gate.threshold == 0.0
    assert _counts(fused.stem) == (1, 0) and _counts(fused.head) == (1, 0)
    assert [d.sources for d in report.declines if d.reason is Reason.UNTRACEABLE][0] == ("_WithGate",)


def test_data_dependent_control_flow_twin_keeps_the_gated_convs() -> None:
    """The twin: the two convs around the data-dependent branch are never merged."""
    torch.manual_seed(5)
    model = _WithGate().eval()
    fused = convfuse.fuse(model)
    assert _counts(fused.gate) == (2, 0)
    for x in (torch.randn(2, 3, 6, 6), -torch.ones(1, 3, 6, 6)):
        assert rel_err(_out(model, x), _out(fused, x)) <= FP32


# --------------------------------------------------------------------------- hooks
def test_forward_hooks_on_a_fused_block_still_fire() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(RepVGGBlock(4, 4), nn.ReLU()).eval()
    seen: list[tuple[int, ...]] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    model.register_forward_pre_hook(lambda m, i: seen.append(("pre",)))
    x = torch.randn(2, 4, 6, 6)
    fused = convfuse.fuse(model, example_inputs=x)
    assert seen == []  # convfuse's own runs (trace, self-check) never call the caller's hooks
    assert _counts(fused) == (1, 0)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32
    seen.clear()
    _out(fused, x)
    assert seen == [("pre",), (2, 4, 6, 6)]


def test_hooked_block_inside_a_traced_parent_is_fused_on_its_own_and_its_hook_fires() -> None:
    """Tracing the parent keeps the hooked block whole (its hook is never called with Proxies);
    the block is then fused on its own."""
    torch.manual_seed(6)
    model = randomize_bn(_Stage(4)).eval()
    seen = []
    model.block.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    fused = convfuse.fuse(model)
    assert seen == [] and _counts(fused) == (2, 0) and fused.block._forward_hooks
    x = torch.randn(2, 4, 6, 6)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32 and seen == ["RepVGGBlock", "RepVGGBlock"]


def test_hook_on_a_layer_twin_keeps_that_layer() -> None:
    """The twin: a hook on a BatchNorm would stop running if the BN were folded: it stays."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), rand_bn(4), nn.ReLU()).eval()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    x = torch.randn(2, 3, 6, 6)
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)
    assert _counts(fused) == (1, 1) and any("hooks" in d.decline.message for d in report.declines)
    seen.clear()
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32 and seen == [4, 4]


# --------------------------------------------------------------------------- custom methods, jit, export
class _Stage(nn.Module):
    """A block with its own methods and attributes, as public code writes them."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = RepVGGBlock(c, c)
        self.proj = conv_bn(c, c, 1)
        self.width = c
        self.tags = ["stage", "rep"]

    def forward(self, x):
        return self.proj(self.block(x))

    def describe(self) -> str:
        return f"{type(self).__name__}({self.width}, {'/'.join(self.tags)})"

    def reparameterized(self) -> bool:
        return sum(isinstance(m, nn.BatchNorm2d) for m in self.modules()) == 0


def test_custom_methods_work_after_fusing() -> None:
    torch.manual_seed(8)
    model = _Stage(4).eval()
    fused = convfuse.fuse(model)
    assert isinstance(fused, _Stage) and fused.describe() == "_Stage(4, stage/rep)"
    assert fused.reparameterized() and not model.reparameterized()
    assert fused.training is False and fused.tags is not model.tags  # a copy, same values
    x = torch.randn(2, 4, 5, 5)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32
    again = pickle.loads(pickle.dumps(fused))
    assert type(again).__name__ == "_Stage" and torch.equal(_out(again, x), _out(fused, x))


def test_custom_method_twin_training_flag_is_kept() -> None:
    """The twin: a module left in training mode (no BatchNorm) keeps ``training=True``
    everywhere, and train-mode Dropout stops the merge across it."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.Conv2d(4, 4, 1))
    fused = convfuse.fuse(model)
    assert all(m.training for m in fused.modules()) and _counts(fused)[0] == 2


def _scriptable(model: nn.Module) -> bool:
    try:
        torch.jit.script(model)
    except Exception:  # noqa: BLE001 - the original does not script: nothing to keep
        return False
    return True


@pytest.mark.parametrize("make", [lambda: RepVGGBlock(4, 4), lambda: TrainBlock(4, 8), lambda: _Stage(4)])
def test_jit_script_works_on_the_fused_module_where_it_worked_on_the_original(make) -> None:
    torch.manual_seed(10)
    model = randomize_bn(make()).eval()
    fused = convfuse.fuse(model)
    x = torch.randn(2, 4, 6, 6)
    if _scriptable(model):
        scripted = torch.jit.script(fused)
        assert rel_err(_out(model, x), _out(scripted, x)) <= FP32
    else:
        assert rel_err(_out(model, x), _out(fused, x)) <= FP32


def _exportable(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        torch.export.export(model, (x,))
    except Exception:  # noqa: BLE001 - the original does not export: nothing to keep
        return False
    return True


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: _detector().model[4], (1, 16, 8, 8)),
        (lambda: SRNet(num_block=1), (1, 3, 8, 8)),
        (lambda: _Stage(4), (1, 4, 6, 6)),
    ],
    ids=["repconv", "sr-net", "stage"],
)
def test_torch_export_works_on_the_fused_module_where_it_worked_on_the_original(make, shape) -> None:
    torch.manual_seed(11)
    model = randomize_bn(make()).eval()
    fused = convfuse.fuse(model)
    x = torch.randn(*shape)
    if _exportable(copy.deepcopy(model), x):
        exported = torch.export.export(fused, (x,))
        assert rel_err(_out(model, x), exported.module()(x)) <= FP32
    else:  # the twin: not exportable before, still an ordinary working module after
        assert rel_err(_out(model, x), _out(fused, x)) <= FP32


# --------------------------------------------------------------------------- the self-check
def _perturb_merges(monkeypatch, factor: float, kernel: int | None = None) -> None:
    """Make the torch front end write wrong merged convs (weights scaled by ``factor``; only
    those with a ``kernel``-wide kernel when given)."""
    real = torch_export.conv_from_spec

    def wrong(spec, *args):
        conv = real(spec, *args)
        if isinstance(conv, nn.Conv2d) and kernel in (None, conv.weight.shape[-1]):
            with torch.no_grad():
                conv.weight.mul_(factor)
        return conv

    monkeypatch.setattr(torch_export, "conv_from_spec", wrong)


def test_self_check_puts_back_a_part_that_does_not_match(monkeypatch) -> None:
    """A wrong merge (the merged 3x3 scaled by 1.01 here) is caught before returning: that
    module is put back with reason self-check, the rest stays fused."""
    _perturb_merges(monkeypatch, 1.01, kernel=3)
    torch.manual_seed(12)
    model = _Stage(4).eval()
    x = torch.randn(2, 4, 6, 6)
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32
    (line,) = [d for d in report.declines if d.reason is Reason.SELF_CHECK and d.sources == ("block",)]
    assert "differs" in line.decline.message
    assert _counts(fused.block) == (2, 3) and _counts(fused.proj) == (1, 0)  # only the bad part back
    assert all("block" not in m.sources[0] for m in report.merges)


def test_self_check_twin_skipped_with_check_false_and_noted_without_inputs(monkeypatch) -> None:
    """The twins: ``check=False`` returns the (here wrong) merge unchecked and says so; a model
    that does not start with a conv and has no example inputs is returned with a note that no
    check could run."""
    _perturb_merges(monkeypatch, 2.0)
    torch.manual_seed(13)
    model = _Stage(4).eval()
    fused, report = convfuse.fuse(model, return_report=True, check=False)
    assert "self-check: skipped (check=False)" in report.notes
    x = torch.randn(1, 4, 5, 5)
    assert rel_err(_out(model, x), _out(fused, x)) > FP32
    monkeypatch.undo()
    linear_first = nn.Sequential(rand_bn(4), nn.Conv2d(4, 4, 1)).eval()
    _, report = convfuse.fuse(linear_first, return_report=True)
    assert any(n.startswith("self-check: not run (no example_inputs") for n in report.notes)


def test_example_spatial_size_allows_every_stride() -> None:
    assert example_spatial_size([(2, 2)] * 5, [(3, 3)], 2) == (32, 32)
    assert example_spatial_size([], [(7, 7)], 2) == (14, 14)  # twice the largest kernel
    assert example_spatial_size([(1,)], [(1,)], 1, minimum=8) == (8,)
    assert example_spatial_size([(2, 1)] * 10, [(3, 3)], 2, limit=256) == (256, 8)  # capped
    x = infer_example_input(_detector())
    assert x is not None and x[0].shape == (2, 3, 32, 32)
    sizes = [c[0].shape[-1] for c in candidate_inputs(_detector())]
    derived = [s[-1] for s in derived_spatial_sizes(_detector(), 2)]
    assert derived and sizes == derived + [8, 16, 32, 64, 128]  # the self-check uses the first that runs
    assert infer_example_input(nn.Sequential(nn.Linear(3, 4), nn.Conv2d(4, 4, 1))) is None  # twin


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.MaxPool2d(3, 2), nn.Conv2d(8, 8, 3, dilation=2)),
        nn.Sequential(nn.Conv1d(3, 4, 5, 2), nn.AvgPool1d(4, 4, ceil_mode=True)),
        nn.Sequential(nn.Conv3d(2, 2, 3, padding="same"), nn.MaxPool3d(2)),
    ],
)
def test_derived_sizes_are_the_verifiers_and_run(model: nn.Module) -> None:
    """The self-check's first candidates come from convfuse.sizes (the ONNX verifier's size
    derivation): two sizes of different parity, the smallest the model runs at, and each runs."""
    ndim = model[0].weight.dim() - 2
    second, first = derived_spatial_sizes(model, ndim)
    assert (second[0] - first[0]) % 2 == 1
    for size in (second, first):
        model(torch.randn(1, model[0].in_channels, *size))
    smaller = tuple(n - 1 for n in first)
    with pytest.raises(RuntimeError):  # twin: one below the smallest size does not run
        model(torch.randn(1, model[0].in_channels, *smaller))
    assert [tuple(c[0].shape[2:]) for c in candidate_inputs(model)][:2] == [second, first]


# --------------------------------------------------------------------------- one error family
def test_torch_fx_failures_are_convfuse_errors_naming_the_module(monkeypatch) -> None:
    real = torch_surgery._forward_from_src
    monkeypatch.setattr(torch_surgery, "_forward_from_src", lambda src, g, *a: real(src + "\n  )(", g))
    torch_surgery._CLASSES.clear()
    with pytest.raises(TorchFxError, match=r"torch.fx failed while convfuse rewrote block \(RepVGGBlock\)"):
        convfuse.fuse(_Stage(4).eval())
    torch_surgery._CLASSES.clear()


def test_unexpected_exceptions_are_one_line_internal_errors_twin(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(torch_regions, "plan", broken)
    with pytest.raises(InternalError) as info:
        convfuse.fuse(RepVGGBlock(4, 4).eval())
    assert isinstance(info.value, ConvfuseError)
    assert str(info.value).startswith("internal error: ValueError: boom second line (a bug in convfuse")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- tracing never changes a module
class _Writer(nn.Module):
    """Writes a tensor, a list entry and a counter while running (traced: Proxies)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(3, 4, 1)
        self.scale = torch.ones(1)
        self.calls = 0
        self.last: list[torch.Tensor] = []

    def forward(self, x):
        self.scale = self.scale.type_as(x)
        y = self.conv(x) * self.scale
        self.last.append(y)
        return y


def test_tracing_restores_what_a_forward_writes() -> None:
    torch.manual_seed(14)
    model = _Writer().eval()
    x = torch.randn(2, 3, 4, 4)
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)
    assert model.last == [] and isinstance(model.scale, torch.Tensor)
    assert fused.last == [] and type(fused.scale) is torch.Tensor
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32 and len(fused.last) == 1


# --------------------------------------------------------------------------- aliases and unknown sizes
class _Aliased(nn.Module):
    def __init__(self, alias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = rand_bn(4)
        if alias:
            self.norm = self.bn  # the same BN under a second name; the forward uses that one

    def forward(self, x):
        return torch.relu(getattr(self, "norm", self.bn)(self.conv(x)))


@pytest.mark.parametrize("alias", [True, False], ids=["two-names", "one-name-twin"])
def test_layer_registered_under_two_names_is_not_replaced_in_place(alias: bool) -> None:
    """Surgery at one name would leave the other calling the old BN: a generated forward
    instead, the BN replaced under both names. The twin, one name: surgery."""
    torch.manual_seed(15)
    model = _Aliased(alias=alias).eval()
    x = torch.randn(2, 3, 6, 6)
    fused = convfuse.fuse(model, example_inputs=x)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32 and _counts(fused)[1] == 0
    assert (generated_code(fused) is not None) is alias
    assert alias or (_counts(fused) == (1, 0) and type(fused.bn) is FoldedBatchNorm)


class _FixedHead(nn.Module):
    """LeNet-style: the Linear head wants exactly 32x32 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 5), rand_bn(6), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(6 * 14 * 14, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def test_model_whose_size_cannot_be_inferred_is_fused_and_says_it_was_not_checked() -> None:
    torch.manual_seed(16)
    model = _FixedHead().eval()
    fused, report = convfuse.fuse(model, return_report=True)
    assert any(
        n.startswith("self-check: not run (the original module fails on an inferred input")
        for n in report.notes
    )
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32 and _counts(fused) == (1, 0)


def test_model_whose_size_is_given_twin_is_checked() -> None:
    torch.manual_seed(16)
    model = _FixedHead().eval()
    _, report = convfuse.fuse(model, return_report=True, example_inputs=torch.randn(1, 3, 32, 32))
    assert any(
        n.startswith("self-check: fused and original agree on example inputs (1, 3, 32, 32)")
        for n in report.notes
    )


# --------------------------------------------------------------------------- constants the tracer creates
_MASK = torch.linspace(0.5, 1.5, 36).view(1, 1, 6, 6)  # a global tensor: fx stores it as _tensor_constant0


class _GlobalMask(nn.Module):
    def __init__(self, as_buffer: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        if as_buffer:
            self.register_buffer("mask", _MASK.clone())

    def forward(self, x):
        mask = self.mask if hasattr(self, "mask") else _MASK
        return (self.a(x) + self.b(x)) * mask


def test_tensor_constant_the_tracer_creates_is_kept_for_the_generated_forward() -> None:
    """The issue's fx lint failure (``_tensor_constant0 ... references nonexistent attribute``):
    the generated forward gets the constant as a non-persistent buffer; state_dict keys stay."""
    torch.manual_seed(17)
    model = _GlobalMask(as_buffer=False).eval()
    x = torch.randn(2, 3, 6, 6)
    fused = convfuse.fuse(model, example_inputs=x)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32 and _counts(fused)[0] == 1
    assert not any("_tensor_constant" in k for k in fused.state_dict())


def test_buffer_constant_twin_stays_a_buffer() -> None:
    torch.manual_seed(17)
    model = _GlobalMask(as_buffer=True).eval()
    x = torch.randn(2, 3, 6, 6)
    fused = convfuse.fuse(model, example_inputs=x)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32 and _counts(fused)[0] == 1
    assert torch.equal(fused.mask, model.mask) and "mask" in fused.state_dict()


def test_a_graph_module_comes_back_a_graph_module_with_the_fused_graph() -> None:
    torch.manual_seed(18)
    model = randomize_bn(RepVGGBlock(4, 4)).eval()
    traced = torch.fx.symbolic_trace(model)
    fused, report = convfuse.fuse(traced, return_report=True)
    x = torch.randn(2, 4, 6, 6)
    assert isinstance(fused, torch.fx.GraphModule) and _counts(fused) == (1, 0)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32 and "self.fused(x)" in fused.code
    assert torch.equal(_out(pickle.loads(pickle.dumps(fused)), x), _out(fused, x))
    assert not any(d.reason is Reason.SELF_CHECK for d in report.declines)


def test_a_plain_module_twin_never_becomes_a_graph_module() -> None:
    torch.manual_seed(18)
    fused = convfuse.fuse(randomize_bn(RepVGGBlock(4, 4)).eval())
    assert not isinstance(fused, torch.fx.GraphModule) and type(fused).__mro__[1] is RepVGGBlock


class _Noisy(nn.Module):
    def __init__(self, noise: float) -> None:
        super().__init__()
        self.body = conv_bn(3, 4, 3, padding=1)
        self.noise = noise

    def forward(self, x):
        y = self.body(x)
        return y + self.noise * torch.randn_like(y)


def test_a_model_that_does_not_repeat_itself_is_not_checked_and_says_so() -> None:
    torch.manual_seed(19)
    fused, report = convfuse.fuse(_Noisy(0.1).eval(), return_report=True)
    assert any("not run" in n and "different outputs on the same input" in n for n in report.notes)
    assert _counts(fused) == (1, 0)


def test_a_model_that_repeats_itself_twin_is_checked() -> None:
    torch.manual_seed(19)
    model = _Noisy(0.0).eval()
    fused, report = convfuse.fuse(model, return_report=True)
    assert any(n.startswith("self-check: fused and original agree") for n in report.notes)
    x = torch.randn(2, 3, 5, 5)
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32


class _State:
    """A plain object a model keeps its run-time state in."""

    def __init__(self) -> None:
        self.last = None


class _DeepWriter(nn.Module):
    """Writes traced values into a dict of lists and into a plain object's attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), rand_bn(4))
        self.head = RepVGGBlock(4, 4)
        self.cache = {"feats": [], "meta": {"calls": []}}
        self.state = _State()

    def forward(self, x):
        y = self.body(x)
        self.cache["feats"].append(y)
        self.cache["meta"]["calls"].append(y.shape)
        self.state.last = y
        return self.head(y)


def test_nested_writes_of_a_forward_are_restored_after_tracing() -> None:
    torch.manual_seed(20)
    model = _DeepWriter().eval()
    x = torch.randn(2, 3, 6, 6)
    fused = convfuse.fuse(model, example_inputs=x)
    assert fused.cache == {"feats": [], "meta": {"calls": []}} and fused.state.last is None
    assert model.cache == {"feats": [], "meta": {"calls": []}}
    assert rel_err(_out(model, x), _out(fused, x)) <= FP32 and _counts(fused) == (2, 0)
    assert len(fused.cache["feats"]) == 1 and isinstance(fused.state.last, torch.Tensor)


def test_a_forward_without_writes_twin_keeps_its_code() -> None:
    """The twin: no writes, so nothing to restore; the block's own forward still runs (surgery)."""
    torch.manual_seed(20)
    model = nn.Sequential(_Stage(4)).eval()
    fused = convfuse.fuse(model)
    assert generated_code(fused[0]) is None and generated_code(fused[0].block) is not None
