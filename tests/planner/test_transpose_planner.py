"""Transposed convs through the planner (issue 12): the rule table of convfuse.maps, the torch
and ONNX front ends, property tests in float64 against torch, and a negative twin for every
declined case (the naive fold shown wrong there)."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from torch import nn

import convfuse
from benchmarks.transpose_planner import Decoder
from benchmarks.transpose_planner import randomise as _randomise
from convfuse import maps
from convfuse.algebra import identity
from convfuse.decline import Decline, Reason
from convfuse.frontends.torch.transpose import Crop, conv_transpose_from_spec, spec_from_conv_transpose
from convfuse.ir import LinearGraph, LinearNode, OpKind
from convfuse.planner import plan
from convfuse.report import MergeKind
from convfuse.spec import ConvSpec
from convfuse.transpose import ConvTransposeSpec, shift_response
from convfuse.verify import verify_onnx
from tests.frontends.onnx.test_transpose_onnx import _FORMS, _node_attrs
from tests.support.helpers import rel_err
from tests.support.onnx_builders import fuse_checked, ops
from tests.support.sr_models import export
from tests.support.transpose_cases import branches, min_input, np_rand

_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None)
EXAMPLES = int(os.environ.get("TRANSPOSE_EXAMPLES", 60))
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _leaves(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if next(m.children(), None) is None]


def _count(module: nn.Module, types: tuple[type, ...]) -> int:
    return sum(isinstance(m, types) for m in _leaves(module))


# --------------------------------------------------------------------------- the rule table
def test_the_rule_table_covers_every_pair_of_map_types_and_names_its_algebra() -> None:
    types = list(maps.TYPES)
    for a in types:
        for b in types:
            assert (a, b) in {r.pattern for r in maps.COMPOSE}, (a, b)
    rows = maps.rule_table()
    assert {op for op, *_ in rows} == {"compose", "add", "concat", "scaled"}
    algebras = {row[4] for row in rows}
    assert (
        "convfuse.border_map.compose_maps" in algebras  # conv then conv: algebra.compose, case 2's ring
        and "convfuse.transpose.transpose_then_pointwise" in algebras
    )
    assert "convfuse.transpose.pointwise_then_transpose" in algebras
    assert "convfuse.transpose.add_transposed" in algebras


def test_maps_dispatch_by_type_and_decline_what_no_entry_covers() -> None:
    t = ConvTransposeSpec(np.ones((2, 3, 2, 2)), stride=(2, 2))
    conv = ConvSpec(np.ones((2, 3, 1, 1)))
    assert isinstance(maps.compose(t, conv), ConvTransposeSpec)
    assert isinstance(maps.compose(conv.replace(weight=np.ones((2, 2, 1, 1))), t), ConvTransposeSpec)
    twice = maps.compose(t, ConvTransposeSpec(np.ones((3, 2, 2, 2))))
    assert isinstance(twice, Decline) and twice.reason is Reason.UNSUPPORTED
    spatial = maps.compose(t, ConvSpec(np.ones((2, 3, 3, 3)), pads=((1, 1), (1, 1))))
    assert isinstance(spatial, Decline) and spatial.reason is Reason.NOT_POINTWISE
    assert maps.macs(t) == 2 * 3 * 4 / 4  # per output position: weight size over the stride product
    assert maps.input_positions(t) == 0.25 and maps.input_positions(conv) == 1
    negated = maps.scaled(t, -1.0)
    assert isinstance(negated, ConvTransposeSpec) and np.array_equal(negated.weight, -t.weight)
    mixed = maps.add(
        [ConvTransposeSpec(np.ones((2, 2, 3, 3)), pads=((1, 1), (1, 1))), identity(2, 2, np.float64)]
    )
    assert isinstance(mixed, ConvTransposeSpec)


def test_concat_of_transposed_convs_stacks_their_channels() -> None:
    rng = np.random.default_rng(0)
    a = ConvTransposeSpec(rng.standard_normal((2, 3, 4)), rng.standard_normal(3), stride=(2,), pads=((1, 1),))
    b = ConvTransposeSpec(rng.standard_normal((2, 2, 2)), None, stride=(2,))
    merged = maps.concat([a, b])
    assert isinstance(merged, ConvTransposeSpec)
    x = rng.standard_normal((1, 2, 5))
    np.testing.assert_allclose(merged.apply(x), np.concatenate([a.apply(x), b.apply(x)], axis=1), atol=1e-12)
    c = ConvTransposeSpec(rng.standard_normal((2, 2, 3)), None, stride=(2,))  # another grid
    assert maps.concat([a, c]).reason is Reason.GRID_MISMATCH  # type: ignore[union-attr]


# --------------------------------------------------------------------------- property tests (torch, float64)
@st.composite
def _chain(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...], dict[str, str]]:
    """[BN | 1x1 (bias or not)] -> ConvTransposeNd -> [BN | 1x1], float64, random geometry."""
    n = draw(st.integers(1, 3))
    kmax = 5 if n < 3 else 3
    g = draw(st.sampled_from([1, 2]))
    ci, co = g * draw(st.integers(1, 2)), g * draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, kmax)) for _ in range(n))
    s = tuple(draw(st.integers(1, 3)) for _ in range(n))
    d = tuple(draw(st.integers(1, 2)) for _ in range(n))
    p = tuple(draw(st.integers(0, dd * (kk - 1))) for kk, dd in zip(k, d))
    op = tuple(draw(st.integers(0, max(ss, dd) - 1)) for ss, dd in zip(s, d))
    if draw(st.booleans()):  # stride 1, rims cropped: a shift before is one constant after
        s, p, op = (1,) * n, tuple(dd * (kk - 1) for kk, dd in zip(k, d)), (0,) * n
    layers: list[nn.Module] = []
    kinds = {
        "pre": draw(st.sampled_from(["", "bn", "1x1", "1x1b"])),
        "post": draw(st.sampled_from(["", "bn", "1x1"])),
    }
    if kinds["pre"] == "bn":
        layers.append(_BN[n - 1](ci))
    elif kinds["pre"]:
        layers.append(_CONV[n - 1](ci, ci, 1, bias=kinds["pre"] == "1x1b"))
    layers.append(_CONVT[n - 1](ci, co, k, s, p, op, groups=g, bias=draw(st.booleans()), dilation=d))
    if kinds["post"] == "bn":
        layers.append(_BN[n - 1](co))
    elif kinds["post"]:
        layers.append(_CONV[n - 1](co, draw(st.integers(1, 3)), 1, groups=1, bias=draw(st.booleans())))
    # The smallest input with a non-empty output, plus a little.
    size = tuple(
        max(1, 1 + math.ceil(max(0, 2 * pp - dd * (kk - 1) - oo) / ss)) + draw(st.integers(0, 2))
        for kk, ss, dd, pp, oo in zip(k, s, d, p, op)
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = _randomise(nn.Sequential(*layers).double(), seed=draw(st.integers(0, 2**16)))
    return model, size, kinds


@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(_chain())
def test_chains_around_a_transposed_conv_fold_exactly_in_float64(case) -> None:
    _check_chain(case)


@pytest.mark.slow
@settings(max_examples=600, **_SETTINGS)
@given(_chain())
def test_chains_around_a_transposed_conv_sweep(case) -> None:
    _check_chain(case)


@settings(max_examples=max(EXAMPLES // 3, 5), **_SETTINGS)
@given(_chain())
def test_chains_around_a_transposed_conv_through_onnx_runtime(case) -> None:
    """The same chains in float32, exported to ONNX, fused, checked by the checker and ONNX
    Runtime (which needs output_padding < stride)."""
    model, size, kinds = case
    convt = next(m for m in model if isinstance(m, _CONVT))
    assume(all(o < s for o, s in zip(convt.output_padding, convt.stride)))
    model = model.float()
    onnx_model = export(model, (1, _channels(model), *size))
    fused, report = fuse_checked(onnx_model, policy="always")  # checker, ONNX Runtime within 1e-5
    assert ops(fused)["ConvTranspose"] == 1
    if kinds["post"]:
        assert any("convtranspose" in m.kind for m in report.merges)


def _check_chain(case) -> float:
    model, size, kinds = case
    x = torch.randn(2, _channels(model), *size, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    assume(want.numel() > 0)
    fused, report = convfuse.fuse(model, policy="always", return_report=True)
    with torch.no_grad():
        got = fused(x)
    assert got.shape == want.shape
    assert rel_err(want, got) <= 1e-9
    convt = next(m for m in model if isinstance(m, _CONVT))
    after = _count(fused, _CONV) + _count(fused, _BN)
    if kinds["post"]:  # BN / 1x1 after a transposed conv always fold
        assert any("convtranspose" in m.kind and len(m.sources) >= 2 for m in report.merges), report.verbose()
    pre_folds = kinds["pre"] in ("", "1x1")  # no shift before: the weight part always folds
    if kinds["pre"] in ("bn", "1x1b"):
        pre = model[0]
        shift = (
            pre.bias.detach().numpy()
            if isinstance(pre, _CONV)
            else (pre.bias - pre.running_mean * pre.weight / torch.sqrt(pre.running_var + pre.eps))
            .detach()
            .numpy()
        )
        pre_folds = not isinstance(shift_response(spec_from_conv_transpose(convt), shift), Decline)
        if not pre_folds:
            assert Reason.SHIFT_NOT_CONSTANT in {d.reason for d in report.declines}, report.verbose()
    folded = "folds" if pre_folds else "declined"
    event(f"before: {kinds['pre'] or 'nothing'} ({folded}); after: {kinds['post']}")
    expected_left = 0 if pre_folds or not kinds["pre"] else 1
    assert after == expected_left, (kinds, report.verbose())
    assert _count(fused, _CONVT) == 1
    return rel_err(want, got)


def _channels(model: nn.Module) -> int:
    first = model[0]
    return first.num_features if isinstance(first, _BN) else first.in_channels


# --------------------------------------------------------------------------- the decoder
@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_decoder_fuses_in_torch_to_one_layer_per_stage(n: int) -> None:
    model = _randomise(Decoder(n))
    x = torch.randn(2, 3, *([6] * n))
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= 1e-5
    assert (_count(model, _CONV), _count(model, _BN), _count(model, _CONVT)) == (2, 2, 2)
    assert (_count(fused, _CONV), _count(fused, _BN), _count(fused, _CONVT)) == (1, 0, 2)
    kinds = sorted(m.kind for m in report.merges)
    assert kinds == ["conv+bn", "convtranspose+bn", "convtranspose+conv"]
    groups = {m.kind: m.group for m in report.merges}
    assert groups["convtranspose+bn"] is MergeKind.CONV_BN and groups["convtranspose+conv"] is MergeKind.CHAIN
    assert report.after.macs <= report.before.macs and report.after.params < report.before.params
    assert f"ConvTranspose{n}d" in report.summary()  # listed in the before/after table


def test_the_decoder_fuses_in_onnx_and_the_verifier_blames_a_wrong_merged_convtranspose() -> None:
    model = export(Decoder(), (1, 3, 8, 8))
    assert ops(model)["ConvTranspose"] == 2 and ops(model)["BatchNormalization"] == 2
    fused, report = fuse_checked(model)  # checker, interface, ONNX Runtime within 1e-5
    counts = ops(fused)
    assert (counts["Conv"], counts["BatchNormalization"], counts["ConvTranspose"]) == (1, 0, 2)
    assert report.before.op_counts["ConvTranspose"] == report.after.op_counts["ConvTranspose"] == 2
    assert "ConvTranspose" in report.summary()
    assert report.after.macs is not None and report.after.macs < report.before.macs
    # MACs count a transposed conv per input position x kernel: /up reads 8x8, /up2 16x16.
    up = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
    assert up.name == "/up/ConvTranspose"
    # A wrong merged ConvTranspose is named by the verifier like any node.
    wrong = onnx.ModelProto()
    wrong.CopyFrom(fused)
    node = next(n for n in wrong.graph.node if n.op_type == "ConvTranspose" and n.name == "/up/ConvTranspose")
    init = next(t for t in wrong.graph.initializer if t.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w.reshape(-1)[int(np.argmax(np.abs(w)))] *= 1.01
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    result = verify_onnx(model, wrong)
    assert not result.passed
    (suspect,) = result.suspects
    assert suspect.candidate_nodes == ("ConvTranspose '/up/ConvTranspose'",)
    assert "ConvTranspose '/up/ConvTranspose'" in suspect.reference_nodes
    assert verify_onnx(model, fused).passed  # twin: the right merge passes


def test_onnx_macs_count_transposed_convs_per_input_position() -> None:
    model = export(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2)), (1, 4, 5, 5))
    _, report = convfuse.fuse_onnx(model)
    assert report.before.macs == 4 * 6 * 9 * 25  # not per output position (11 x 11)


# --------------------------------------------------------------------------- declines, each with its twin
def _shifted_upsampler(bias: bool) -> nn.Module:
    return _randomise(
        nn.Sequential(nn.Conv2d(4, 4, 1, bias=bias), nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1))
    )


@pytest.mark.parametrize("front", ["torch", "onnx"])
def test_a_bias_before_a_strided_transposed_conv_is_declined_and_the_naive_fold_is_wrong(front: str) -> None:
    model = _shifted_upsampler(bias=True)
    x = torch.randn(1, 4, 5, 5)
    if front == "torch":
        fused, report = convfuse.fuse(model, policy="always", return_report=True)
        assert _count(fused, _CONV) == 1 and _count(fused, _CONVT) == 1
    else:
        fused_onnx, report = fuse_checked(export(model, (1, 4, 5, 5)), policy="always")
        assert ops(fused_onnx)["Conv"] == 1
    (decline,) = [d for d in report.declines if d.reason is Reason.SHIFT_NOT_CONSTANT]
    assert "tap sets" in decline.decline.message
    # The naive fold (the weight part, the bias through the whole kernel) is wrong on the rim.
    conv, convt = model[0], model[1]
    w = torch.einsum("ci,cojk->iojk", conv.weight[:, :, 0, 0], convt.weight)
    naive_bias = convt.bias + torch.einsum("c,cojk->o", conv.bias, convt.weight)
    with torch.no_grad():
        naive = F.conv_transpose2d(x, w, naive_bias, 2, 1)
        assert rel_err(model(x), naive) > 1e-3


@pytest.mark.parametrize("front", ["torch", "onnx"])
def test_twin_a_bias_free_1x1_before_a_strided_transposed_conv_folds(front: str) -> None:
    model = _shifted_upsampler(bias=False)
    if front == "torch":
        fused, report = convfuse.fuse(model, policy="always", return_report=True)
        assert _count(fused, _CONV) == 0 and _count(fused, _CONVT) == 1
        x = torch.randn(1, 4, 5, 5)
        with torch.no_grad():
            assert rel_err(model(x), fused(x)) <= 1e-5
    else:
        fused_onnx, report = fuse_checked(export(model, (1, 4, 5, 5)), policy="always")
        assert ops(fused_onnx)["Conv"] == 0 and ops(fused_onnx)["ConvTranspose"] == 1
    assert [m.kind for m in report.merges] == ["conv+convtranspose"]


def test_a_bias_before_a_rim_cropped_stride_1_transposed_conv_folds() -> None:
    """Positive twin of the shift decline: stride 1 and crops p >= d(k-1) see the full kernel
    everywhere, so the bias before is one constant after."""
    model = _randomise(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ConvTranspose2d(4, 3, 3, padding=2)))
    fused, report = convfuse.fuse(model, policy="always", return_report=True)
    assert _count(fused, _CONV) == 0
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= 1e-5


@pytest.mark.parametrize("front", ["torch", "onnx"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_a_3x3_after_a_transposed_conv_is_declined_and_a_1x1_folds(front: str, kernel: int) -> None:
    model = _randomise(
        nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2), nn.Conv2d(4, 3, kernel, padding=kernel // 2))
    )
    if front == "torch":
        fused, report = convfuse.fuse(model, policy="always", return_report=True)
        left = _count(fused, _CONV)
    else:
        fused_onnx, report = fuse_checked(export(model, (1, 4, 5, 5)), policy="always")
        left = ops(fused_onnx)["Conv"]
    if kernel == 1:
        assert left == 0 and [m.kind for m in report.merges] == ["convtranspose+conv"]
    else:
        assert left == 1 and not report.merges
        assert Reason.NOT_POINTWISE in {d.reason for d in report.declines}


class _Sum(nn.Module):
    """Two transposed convs of one input, summed (``same`` grids at the test's input size)."""

    def __init__(self, stride2: int, kernel2: int, padding2: int) -> None:
        super().__init__()
        self.a = nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
        self.b = nn.ConvTranspose2d(4, 3, kernel2, stride=stride2, padding=padding2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("front", ["torch", "onnx"])
def test_sums_of_transposed_convs_merge_on_one_grid_and_mismatched_strides_are_declined(front: str) -> None:
    same = _Sum(2, 2, 0)  # 2x2 stride 2 and 4x4 stride 2 pad 1: both 2n, one grid
    other = _Sum(1, 6, 0)  # stride 1, kernel 6: 2n at n = 5 only (no merge for every size)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert same(x).shape == other(x).shape == (1, 3, 10, 10)
        with pytest.raises(RuntimeError):  # at another size the branches do not even add: no one layer
            other(torch.randn(1, 4, 4, 4))
        assert same(torch.randn(1, 4, 4, 4)).shape == (1, 3, 8, 8)
    for module, merges in ((same, 1), (other, 0)):
        if front == "torch":
            fused, report = convfuse.fuse(module.eval(), policy="always", return_report=True)
            with torch.no_grad():
                assert rel_err(module(x), fused(x)) <= 1e-5
            left = _count(fused, _CONVT)
        else:
            fused_onnx, report = fuse_checked(export(module, (1, 4, 5, 5)), policy="always")
            left = ops(fused_onnx)["ConvTranspose"]
        assert len(report.merges) == merges and left == 2 - merges
        if merges:
            assert report.merges[0].group is MergeKind.SUM
        else:
            assert Reason.STRIDE_MISMATCH in {d.reason for d in report.declines}, report.verbose()


class _WithIdentity(nn.Module):
    """A stride-1 'same' transposed conv plus a 1x1 and the identity: one aligned grid."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.ConvTranspose2d(4, 4, 3, padding=1)
        self.p = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.t(x) + self.p(x) + x


def test_identity_and_1x1_branches_align_with_a_stride_1_transposed_conv() -> None:
    module = _WithIdentity().eval()
    fused, report = convfuse.fuse(module, policy="always", return_report=True)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert rel_err(module(x), fused(x)) <= 1e-5
    assert [m.group for m in report.merges] == [MergeKind.SUM]
    assert _count(fused, _CONVT) == 1 and _count(fused, _CONV) == 0
    fused_onnx, onnx_report = fuse_checked(export(module, (1, 4, 6, 6)), policy="always")
    assert ops(fused_onnx)["ConvTranspose"] == 1 and ops(fused_onnx)["Add"] == 0


def test_a_spec_torch_cannot_pad_symmetrically_is_written_with_a_crop_and_counted_as_two_layers() -> None:
    spec = ConvTransposeSpec(np.random.default_rng(0).standard_normal((2, 2, 3, 3)), pads=((2, 0), (0, 0)))
    written = conv_transpose_from_spec(spec)
    assert isinstance(written, nn.Sequential) and isinstance(written[1], Crop)
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5))
    with torch.no_grad():
        np.testing.assert_allclose(written(torch.from_numpy(x)).numpy(), spec.apply(x), atol=1e-12)
    assert maps.layers_written(spec, pad_layer=True) == 2 and maps.layers_written(spec, pad_layer=False) == 1
    symmetric = spec.replace(pads=((1, 1), (0, 0)))  # twin: one module
    assert isinstance(conv_transpose_from_spec(symmetric), nn.ConvTranspose2d)
    assert maps.layers_written(symmetric, pad_layer=True) == 1


def test_a_transposed_conv_called_with_output_size_is_left_alone() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.up(x, output_size=[2 * x.shape[2], 2 * x.shape[3]]))

    module = _randomise(Net())
    fused, report = convfuse.fuse(module, policy="always", return_report=True)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert rel_err(module(x), fused(x)) <= 1e-6
    assert not report.merges
    twin = _randomise(
        nn.Sequential(nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(4))
    )
    assert [m.kind for m in convfuse.fuse(twin, return_report=True)[1].merges] == ["convtranspose+bn"]


def test_functional_conv_transpose_calls_merge_too() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 2, 3, 3))
            self.b = nn.Parameter(torch.randn(4))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(
                F.conv_transpose2d(x, self.w, self.b, stride=2, padding=1, output_padding=1, groups=2)
            )

    module = _randomise(Net())
    fused, report = convfuse.fuse(module, return_report=True)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        assert rel_err(module(x), fused(x)) <= 1e-5
    assert [m.kind for m in report.merges] == ["convtranspose+bn"]


def _bilinear(channels: int, stride: int) -> torch.Tensor:
    """FCN's bilinear upsampling kernel (k = 2s), depthwise: every phase class sums to 1."""
    k = 2 * stride
    center = (k - 1) / 2
    f = 1 - torch.abs(torch.arange(k, dtype=torch.float64) - center) / stride
    return (f[:, None] * f[None, :]).expand(channels, 1, k, k).clone()


@pytest.mark.parametrize("padding", [2, 1])
def test_a_bn_before_a_bilinear_upsampler_folds_where_every_output_sees_a_full_phase(padding: int) -> None:
    """k = 4, s = 2: with p = 2 every output position sees one full phase class (sum 1), so the
    BN shift is one constant after; the usual p = 1 leaves rims of one tap: declined (twin)."""
    up = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=padding, groups=4, bias=False)
    with torch.no_grad():
        up.weight.copy_(_bilinear(4, 2))
    model = _randomise(nn.Sequential(nn.BatchNorm2d(4), up))
    fused, report = convfuse.fuse(model, policy="always", return_report=True)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= 1e-5
    if padding == 2:
        assert [m.kind for m in report.merges] == ["bn+convtranspose"] and _count(fused, _BN) == 0
    else:
        assert not report.merges and _count(fused, _BN) == 1
        assert Reason.SHIFT_NOT_CONSTANT in {d.reason for d in report.declines}


# --------------------------------------------------------------------------- sums through the planner (IR)
def _ir_node(name: str, spec: ConvSpec | ConvTransposeSpec, x: str, y: str) -> LinearNode:
    kind = OpKind.CONV_TRANSPOSE if isinstance(spec, ConvTransposeSpec) else OpKind.CONV
    return LinearNode(
        name, kind, (x,), y, lambda info, s=spec: s, ndim=spec.ndim, in_channels=spec.in_channels,
        weights={name: spec.params()},
    )  # fmt: skip


def _run(spec: ConvSpec | ConvTransposeSpec, x: np.ndarray) -> np.ndarray:
    if isinstance(spec, ConvTransposeSpec):
        return spec.apply(x)
    return spec.apply(torch.from_numpy(x)).numpy()


@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(branches(with_convs=True), st.lists(st.sampled_from([1.0, -1.0, 0.5]), min_size=4, max_size=4))
def test_sums_of_transposed_convs_and_aligned_convs_become_one_layer_through_the_planner(
    parts, coefs
) -> None:
    """2-4 branches of one input on one grid (transposed convs, 1x1 / spatial stride-1 convs,
    identity), summed with coefficients (Sub, scaled branches): one ConvTranspose, float64."""
    nodes = [_ir_node(f"b{i}", p, "x", f"t{i}") for i, p in enumerate(parts)]
    coefs = coefs[: len(parts)]
    nodes.append(
        LinearNode("sum", OpKind.SUM, tuple(f"t{i}" for i in range(len(parts))), "y", coefs=tuple(coefs))
    )
    result = plan(LinearGraph(nodes, {"y"}, {"y"}), "always")
    (merge,) = result.merges
    assert isinstance(merge.spec, ConvTransposeSpec) and merge.group is MergeKind.SUM
    first = next(p for p in parts if isinstance(p, ConvTransposeSpec))
    x = np_rand(2, first.in_channels, *[m + 2 for m in min_input(first)], seed=3)
    want = sum(c * _run(p, x) for c, p in zip(coefs, parts))
    got = merge.spec.apply(x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-9 * max(np.abs(want).max(), 1e-30)


def test_twin_a_strided_transposed_conv_beside_a_1x1_is_declined_with_stride_mismatch() -> None:
    t = ConvTransposeSpec(np_rand(2, 2, 2, 2, seed=1), stride=(2, 2))
    one = ConvSpec(np_rand(2, 2, 1, 1, seed=2))
    nodes = [_ir_node("t", t, "x", "a"), _ir_node("p", one, "x", "b")]
    nodes.append(LinearNode("sum", OpKind.SUM, ("a", "b"), "y", coefs=(1.0, 1.0)))
    result = plan(LinearGraph(nodes, {"y"}, {"y"}), "always")
    assert not result.merges
    assert Reason.STRIDE_MISMATCH in {d.reason for _, d in result.declines}


@pytest.mark.parametrize("pad_layer", [True, False])
def test_a_merge_the_writer_cannot_express_is_declined_at_planning(pad_layer: bool) -> None:
    """output_padding 1 at stride 1, dilation 2: torch writes it (below max(s, d)), ONNX Runtime
    refuses output_padding >= stride, so the ONNX-side plan keeps the layers (twin: torch merges)."""
    t = ConvTransposeSpec(np_rand(2, 2, 2, 2, seed=1), stride=(1, 1), dilation=(2, 2), output_padding=(1, 1))
    bn = ConvSpec(np_rand(2, 1, 1, 1, seed=2), np_rand(2, seed=3), groups=2)
    nodes = [_ir_node("t", t, "x", "a"), _ir_node("bn", bn, "a", "y")]
    result = plan(LinearGraph(nodes, {"y"}, {"y"}, pad_layer=pad_layer), "always")
    if pad_layer:
        (merge,) = result.merges
        assert isinstance(merge.spec, ConvTransposeSpec)
    else:
        assert not result.merges
        (decline,) = [d for _, d in result.declines if d.reason is Reason.UNSUPPORTED]
        assert "below the stride" in decline.message


@pytest.mark.parametrize("form", _FORMS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("n,k,s,d", [(1, 4, 3, 2), (2, 3, 2, 1)])
def test_every_onnx_padding_form_merges_with_the_batchnorm_after_it(
    form, n: int, k: int, s: int, d: int
) -> None:
    """ConvTranspose (each auto_pad form, output_shape) then BatchNormalization: one ConvTranspose
    with explicit pads, equal in ONNX Runtime, checker passing."""
    size = 4
    attrs = _node_attrs(form, n, k, s, d, size)
    rng = np.random.default_rng(n + k)
    inits = {
        "w": rng.standard_normal((4, 3, *([k] * n))),
        "b": rng.standard_normal(6),
        "gamma": rng.random(6) + 0.5,
        "beta": rng.standard_normal(6),
        "mean": rng.standard_normal(6),
        "var": rng.random(6) + 0.5,
    }
    nodes = [
        onnx.helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], group=2, **attrs),
        onnx.helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "convtranspose_bn",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, *([size] * n)])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None] * (n + 2))],
        [numpy_helper.from_array(v.astype(np.float32), name) for name, v in inits.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    fused, report = fuse_checked(model, policy="always")
    assert ops(fused) == {"ConvTranspose": 1}
    (node,) = fused.graph.node
    names = {a.name for a in node.attribute}
    assert "pads" in names and "auto_pad" not in names and "output_shape" not in names
    assert [m.kind for m in report.merges] == ["convtranspose+bn"]
