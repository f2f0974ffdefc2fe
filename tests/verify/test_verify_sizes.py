"""Verification of models with symbolic batch and spatial dims: the sizes derived from the graph
run, both parities are checked, and a model that cannot be run is said to be unverified."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx.reference import ReferenceEvaluator
from torch import nn

import convfuse
from convfuse.border_map import border_merges
from convfuse.errors import NotRunnableError
from convfuse.frontends.onnx.geometry import geometries
from convfuse.sizes import Geometry
from convfuse.verify import verify_onnx
from convfuse.verify.input_plan import InputPlan
from convfuse.verify.inputs import signature
from convfuse_cli.main import main
from tests.support import dynamic_models as dm


def _shapes(result) -> list[tuple[int, ...]]:  # type: ignore[no-untyped-def]
    return [spec.shape for spec in result.inputs]


@pytest.mark.parametrize(
    "build, shapes",
    [
        (dm.strided_dilated_2d, [(2, 4, 13, 9), (2, 4, 14, 10)]),
        (dm.pooled_1d, [(2, 4, 11), (2, 4, 18)]),
        (dm.pooled_3d, [(2, 2, 2, 5, 5), (2, 2, 3, 6, 6)]),
        (dm.fixed_width_reshape, [(2, 4, 1, 8), (2, 4, 4, 16)]),
        (dm.odd_border, [(2, 4, 4, 4), (2, 4, 5, 5)]),
    ],
)
def test_fused_dynamic_models_verify_at_the_derived_sizes(build, shapes) -> None:  # type: ignore[no-untyped-def]
    model = build()
    fused, report = convfuse.fuse_onnx(model, policy="always")
    assert report.merges or report.declines
    result = verify_onnx(model, fused)
    assert result.passed, result.to_text()
    assert _shapes(result) == shapes
    assert len(result.checks) == 2 * len(model.graph.output)  # every output at both sizes
    # The first size is the smallest that runs: one less along any symbolic spatial axis does not.
    for axis in range(2, len(shapes[0])):
        smaller = list(shapes[0])
        smaller[axis] -= 1
        if smaller[axis] >= 1:
            assert not _runs_at(model, tuple(smaller)), smaller


def _runs_at(model: onnx.ModelProto, shape: tuple[int, ...]) -> bool:
    """Whether the ONNX reference evaluator runs the model at ``shape`` with no output empty: the
    spec's arithmetic (ONNX Runtime truncates a pool window that overhangs the input, and so
    runs some pools below the spec's minimum)."""
    try:
        outputs = ReferenceEvaluator(model).run(None, {"x": np.zeros(shape, np.float32)})
    except Exception:  # the evaluator raises whatever its op implementations raise
        return False
    return all(o.size > 0 for o in outputs)


def test_a_border_bug_at_odd_sizes_is_caught_at_the_second_size_only() -> None:
    """The naive merge of a biased 1x1 into a 2x2 stride-2 conv that pads its end is right at 4
    (the padding is never read) and wrong at 5: the second size is the one that catches it."""
    ref, naive = dm.odd_border(), dm.odd_border(naive=True)
    result = verify_onnx(ref, naive)
    assert not result.passed
    by_shape = {(c.name, c.shape): c for c in result.checks}
    assert by_shape[("head_out", (2, 4, 2, 2))].passed  # size 4: even, the bug is invisible
    wrong = by_shape[("head_out", (2, 4, 3, 3))]  # size 5: odd
    assert not wrong.passed and wrong.comparison is not None and wrong.comparison.location == "border"
    assert [s.check.name for s in result.suspects] == ["head_out"]
    # Twin: the first size alone (what one size would check) passes the same wrong merge.
    assert verify_onnx(ref, naive, shapes={"x": (2, 4, 4, 4)}).passed
    # And convfuse itself declines that merge by case 1 (padding after a biased pointwise conv)...
    with border_merges(False):
        fused, report = convfuse.fuse_onnx(ref, policy="always")
    assert verify_onnx(ref, fused).passed and "padded-after-biased-pointwise" in {
        d.reason.value for d in report.declines
    }
    # ... and merges it exactly with a border correction (issue 14): right at both parities.
    fused, report = convfuse.fuse_onnx(ref, policy="always")
    assert verify_onnx(ref, fused).passed and any("padding case 2" in m.note for m in report.merges)


def test_given_shapes_override_the_derived_ones() -> None:
    model = dm.strided_dilated_2d()
    result = verify_onnx(model, model, shapes={"x": (1, 4, 32, 32)})
    assert _shapes(result) == [(1, 4, 32, 32)] and not any("symbolic" in n for n in result.notes)


def test_the_geometry_walk_reads_windows_pads_pools_and_reshapes() -> None:
    layers = geometries(dm.strided_dilated_2d(), "x", 2)
    windows = [(g.kernel, g.stride, g.dilation, g.pads) for g in layers if g.kernel]
    assert windows == [
        ((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
        ((3, 3), (2, 2), (1, 1), ((1, 1), (1, 1))),
        ((3, 2), (1, 1), (2, 2), ((0, 0), (0, 0))),
        ((3, 3), (2, 2), (1, 1), ((0, 0), (0, 0))),
    ]
    assert len(layers) == 5 and layers[1].kernel == ()  # BatchNormalization keeps the size
    reshape = geometries(dm.fixed_width_reshape(), "x", 2)[-1]
    assert reshape.multiple == (1, 8)
    assert [g.reads for g in geometries(dm.odd_border(), "x", 2)] == [(-1,), (0,), (-1,)]


def test_batch_and_channels_take_2_and_what_the_first_conv_reads() -> None:
    g = dm.Graph(["N", "C", 8, 8])
    model = g.model([g.conv("x", 3, 4, 3)])
    inputs, _ = signature(model)
    plan = InputPlan(model, inputs, inputs)
    assert plan.sizes == 1 and [s.shape for s in plan.first()] == [(2, 3, 8, 8)]
    result = verify_onnx(model, model)
    assert _shapes(result) == [(2, 3, 8, 8)]
    assert any("axis 0: 2 (batch); axis 1: 3 (what its first layer reads)" in n for n in result.notes)


def test_a_constraint_the_walk_misses_is_found_by_trying_larger_sizes() -> None:
    """A space-to-depth written with view/permute on computed shapes: only even sizes run. The
    walk stops at the Reshape; the reference refuses 1 and every odd size, so the search settles
    on 2 and, for the second check, after four odd sizes (3, 5, 7, 9), on 4."""

    class SpaceToDepth(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
            return self.conv(x.reshape(n, c * 4, h // 2, w // 2))

    model = _export(SpaceToDepth(), torch.randn(1, 4, 8, 8))
    result = verify_onnx(model, model)
    assert result.passed
    assert [s.shape for s in result.inputs] == [(2, 4, 2, 2), (2, 4, 4, 4)]
    first, second = [n for n in result.notes if n.startswith("the reference does not run at")]
    assert first.startswith("the reference does not run at 1 size(s) the graph allows, from x 2x4x1x1 (")
    assert first.endswith("): ran at x 2x4x2x2")
    assert second.startswith("the reference does not run at 4 size(s) the graph allows, from x 2x4x3x3 (")


def _export(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """``module`` as a new user exports it: dynamic batch, height and width."""
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            buffer,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}},
            opset_version=17,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


class _Exported(nn.Module):
    """A small RepVGG-ish net as a user would write it: conv-BN-ReLU, a strided 3x3 + 1x1 block,
    max pooling and a dilated conv, exported with dynamic N/H/W."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.k3 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8))
        self.k1 = nn.Sequential(nn.Conv2d(8, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(8, 4, 3, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.k3(x) + self.k1(x))
        return self.head(self.pool(x))


def _randomise_bn(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return module


def test_a_torch_export_with_dynamic_axes_merges_and_verifies_by_default(tmp_path: Path) -> None:
    """The issue's headline case: dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}}."""
    src = tmp_path / "exported.onnx"
    onnx.save_model(_export(_randomise_bn(_Exported()), torch.randn(1, 3, 32, 32)), src)
    result = CliRunner().invoke(main, ["merge", str(src)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no warning: verified
    assert "verified: candidate matches; max rel err" in result.stdout
    assert "over 2 samples at x 2x3x19x19 and 2x3x20x20" in " ".join(result.stdout.split())  # wrapped at 80
    fused = onnx.load(str(tmp_path / "exported.fused.onnx"))
    assert [n.op_type for n in fused.graph.node].count("Conv") < [
        n.op_type for n in onnx.load(str(src)).graph.node
    ].count("Conv")
    assert verify_onnx(src, fused, shapes={"x": (1, 3, 37, 64)}).passed  # and at a size of the user's


# --------------------------------------------------------------------------- cannot be run
def test_a_reference_that_runs_at_no_size_tried_is_not_runnable_in_one_line() -> None:
    with pytest.raises(NotRunnableError) as info:
        verify_onnx(dm.fixed_head(), dm.fixed_head())
    message = str(info.value)
    assert "\n" not in message and "Gemm" in message
    assert message.endswith(
        "(at every input size tried: 8 from x 2x3x1x1 to x 2x3x64x64, derived from the graph; give sizes with --shape)"
    )
    assert verify_onnx(
        dm.fixed_head(), dm.fixed_head(), shapes={"x": (2, 3, 5, 5)}
    ).passed  # twin: it runs at 5


def test_merge_of_an_unrunnable_model_exits_4_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "head.onnx"
    onnx.save_model(dm.fixed_head(), src)
    before = src.read_bytes()

    def merge(*args: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(main, ["merge", str(src), *args], catch_exceptions=False)

    refused = merge()
    assert refused.exit_code == 4
    line = refused.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"convfuse: error: {src}: not verified: the input model cannot be run here (")
    assert "at every input size tried" in line and "give sizes with --shape" in line
    assert line.endswith("; nothing written (--allow-unverified writes it anyway)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.onnx"]

    assert merge("--in-place").exit_code == 4 and src.read_bytes() == before
    allowed = merge("--allow-unverified")
    assert allowed.exit_code == 0 and allowed.stderr.startswith(f"convfuse: warning: {src}: not verified")
    assert (tmp_path / "head.fused.onnx").exists()
    (tmp_path / "head.fused.onnx").unlink()
    assert merge("--no-verify").exit_code == 0
    shaped = merge("--shape", "x=2x3x5x5", "-o", str(tmp_path / "shaped.onnx"))
    assert shaped.exit_code == 0, shaped.output
    assert "over 2 samples at x 2x3x5x5" in " ".join(shaped.stdout.split())  # wrapped at 80
    bad = merge("--shape", "x5")
    assert bad.exit_code == 2 and "NAME=DIMS" in bad.stderr
    assert src.read_bytes() == before


def test_merge_help_lists_the_exit_codes() -> None:
    text = CliRunner().invoke(main, ["merge", "--help"]).output
    assert "4 not verified" in " ".join(text.split()) and "--allow-unverified" in text and "--shape" in text


def test_geometry_defaults_are_an_identity_layer() -> None:
    assert Geometry().out(0, 7) == 7 and Geometry(kernel=(3,), pads=((1, 1),)).out(0, 7) == 7
