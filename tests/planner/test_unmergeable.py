"""Models that load but hold what convfuse cannot merge: those parts stay as they are, the report
says why, and the rest of the model is still merged (API and command line)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import convfuse
from convfuse.algebra import MAX_MERGED_ELEMENTS
from convfuse.decline import Reason
from convfuse_cli.main import main
from tests.support.onnx_builders import Graph, check_fused, ops, reasons

C = 4


def _mergeable_tail(g: Graph, y: str) -> str:
    """Conv + BN after the odd part: always mergeable, so each model shows 'the rest still merges'."""
    return g.bn(g.conv(g.node("Relu", [y]), C, C, 3, pads=[1, 1, 1, 1]), C)


def _finish(
    g: Graph, y: str, opsets: tuple[tuple[str, int], ...] = (), infer: bool = True
) -> onnx.ModelProto:
    """The model with the tail; ``infer=False`` (or custom domains) skips ONNX shape inference."""
    out = _mergeable_tail(g, y)
    if not opsets and infer:
        return g.model([out])
    graph = helper.make_graph(
        g.nodes, "g", g.inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, C, 8, 8])], g.inits
    )
    imports = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, v) for d, v in opsets]
    model = helper.make_model(graph, opset_imports=imports, ir_version=8)
    onnx.checker.check_model(model)
    return model


def _unknown_domain() -> onnx.ModelProto:
    g = Graph([1, C, 8, 8])
    y = g.node("FancyOp", [g.bn(g.conv("x", C, C, 1), C)], domain="com.example")
    return _finish(g, y, (("com.example", 1),))


def _qdq_conv() -> onnx.ModelProto:
    g = Graph([1, C, 8, 8])
    rng = np.random.default_rng(0)
    wq = g.const(rng.integers(-100, 100, (C, C, 3, 3)), "wq", np.int8)
    w = g.node(
        "DequantizeLinear",
        [wq, g.const(np.float32(0.01), "ws", np.float32), g.const(np.int8(0), "wz", np.int8)],
    )
    xs, xz = g.const(np.float32(0.05), "xs", np.float32), g.const(np.uint8(128), "xz", np.uint8)
    x = g.node("DequantizeLinear", [g.node("QuantizeLinear", ["x", xs, xz]), xs, xz])
    return _finish(g, g.bn(g.node("Conv", [x, w], pads=[1, 1, 1, 1]), C))


def _qlinear_conv() -> onnx.ModelProto:
    g = Graph([1, C, 8, 8])
    xs, xz = g.const(np.float32(0.05), "xs", np.float32), g.const(np.uint8(128), "xz", np.uint8)
    wq = g.const(np.random.default_rng(0).integers(-100, 100, (C, C, 3, 3)), "wq", np.int8)
    ws, wz = g.const(np.float32(0.01), "ws", np.float32), g.const(np.int8(0), "wz", np.int8)
    ys, yz = g.const(np.float32(0.1), "ys", np.float32), g.const(np.uint8(128), "yz", np.uint8)
    q = g.node(
        "QLinearConv",
        [g.node("QuantizeLinear", ["x", xs, xz]), xs, xz, wq, ws, wz, ys, yz],
        pads=[1, 1, 1, 1],
    )
    return _finish(g, g.node("DequantizeLinear", [q, ys, yz]))


def _conv_integer() -> onnx.ModelProto:
    g = Graph([1, C, 8, 8])
    xz = g.const(np.uint8(128), "xz", np.uint8)
    xq = g.node("QuantizeLinear", ["x", g.const(np.float32(0.05), "xs", np.float32), xz])
    wq = g.const(np.random.default_rng(0).integers(0, 100, (C, C, 3, 3)), "wq", np.uint8)
    y = g.node("Cast", [g.node("ConvInteger", [xq, wq, xz], pads=[1, 1, 1, 1])], to=TensorProto.FLOAT)
    return _finish(g, y)


def _int8_conv_weight() -> onnx.ModelProto:
    """A Conv whose weight is int8 (not a valid ONNX Conv type, yet the plain checker passes it)."""
    g = Graph([1, C, 8, 8])
    y = g.bn(g.node("Conv", ["x", g.const(np.ones((C, C, 3, 3)), "wi", np.int8)], pads=[1, 1, 1, 1]), C)
    return _finish(g, y, infer=False)


def _with_weight(value: float) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        g = Graph([1, C, 8, 8])
        model = _finish(g, g.bn(g.conv("x", C, C, 3, pads=[1, 1, 1, 1], name="odd"), C))
        w = next(t for t in model.graph.initializer if t.name == model.graph.node[0].input[1])
        array = numpy_helper.to_array(w).copy()
        array.flat[5] = value
        w.CopyFrom(numpy_helper.from_array(array, w.name))
        return model

    return build


def _nan_batchnorm() -> onnx.ModelProto:
    g = Graph([1, C, 8, 8])
    model = _finish(g, g.bn(g.conv("x", C, C, 3, pads=[1, 1, 1, 1]), C))
    mean = next(t for t in model.graph.initializer if t.name == model.graph.node[1].input[3])
    array = numpy_helper.to_array(mean).copy()
    array[1] = np.nan
    mean.CopyFrom(numpy_helper.from_array(array, mean.name))
    return model


def _weights_are_inputs() -> onnx.ModelProto:
    g = Graph([1, C, 8, 8])
    model = _finish(g, g.bn(g.conv("x", C, C, 3, pads=[1, 1, 1, 1]), C))
    w = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(w.name, TensorProto.FLOAT, list(w.dims)))
    return model


def _too_large() -> onnx.ModelProto:
    """1024 -> 1 -> 1024 channels through 65-tap 1D kernels: small weights, a huge merged kernel."""
    g = Graph([1, 1024, 140])
    a = g.conv("x", 1024, 1, 65, bias=False)
    b = g.conv(a, 1, 1024, 65, bias=False)
    out = g.bn(g.conv(g.node("Relu", [b]), 1024, 8, 1), 8)
    return g.model([out])


#: case -> (model, reason of the part left alone, policy, whether ONNX Runtime runs it)
CASES: dict[str, tuple[Callable[[], onnx.ModelProto], Reason, str, bool]] = {
    "unknown operator domain": (_unknown_domain, Reason.UNSUPPORTED, "flops", False),
    "QDQ quantized conv": (_qdq_conv, Reason.NON_CONSTANT, "flops", True),
    "QLinearConv": (_qlinear_conv, Reason.DTYPE, "flops", True),
    "ConvInteger": (_conv_integer, Reason.DTYPE, "flops", True),
    "int8 Conv weight": (_int8_conv_weight, Reason.DTYPE, "flops", False),
    "NaN weight": (_with_weight(np.nan), Reason.NON_FINITE, "flops", True),
    "Inf weight": (_with_weight(np.inf), Reason.NON_FINITE, "flops", True),
    "NaN BatchNorm mean": (_nan_batchnorm, Reason.NON_FINITE, "flops", True),
    "weights that are graph inputs": (_weights_are_inputs, Reason.NON_CONSTANT, "flops", True),
    "merged kernel too large": (_too_large, Reason.TOO_LARGE, "always", True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_left_alone_with_reason_and_the_rest_merged(case: str) -> None:
    build, reason, policy, runs = CASES[case]
    model = build()
    before = model.SerializeToString()
    fused, report = convfuse.fuse_onnx(model, policy=policy)
    assert model.SerializeToString() == before
    assert reason in reasons(report), report.to_text()
    assert report.merges, report.to_text()  # the mergeable tail still merged
    assert ops(fused)["BatchNormalization"] < ops(model)["BatchNormalization"]
    onnx.checker.check_model(fused)
    if runs and case not in ("NaN weight", "Inf weight", "NaN BatchNorm mean"):
        check_fused(model, fused, tol=1e-4)


def test_twins_without_the_problem_merge_that_part_too() -> None:
    """The same shapes with finite constant weights merge the part declined above."""
    g = Graph([1, C, 8, 8])
    model = _finish(g, g.bn(g.conv("x", C, C, 3, pads=[1, 1, 1, 1], name="odd"), C))
    fused, report = convfuse.fuse_onnx(model)
    assert not report.declines or Reason.NON_FINITE not in reasons(report)
    assert "odd" in [m.target for m in report.merges]
    assert ops(fused)["BatchNormalization"] == 0
    check_fused(model, fused)
    small = Graph([1, 64, 140])
    y = small.conv(small.conv("x", 64, 1, 65, bias=False), 1, 64, 65, bias=False)
    fused_small, small_report = convfuse.fuse_onnx(small.model([y]), policy="always")
    assert Reason.TOO_LARGE not in reasons(small_report) and ops(fused_small)["Conv"] == 1
    assert 64 * 64 * 129 < MAX_MERGED_ELEMENTS < 1024 * 1024 * 129


def test_messages_name_the_node_tensor_and_shape() -> None:
    _, report = convfuse.fuse_onnx(_with_weight(np.nan)())
    message = next(d.decline.message for d in report.declines if d.reason is Reason.NON_FINITE)
    assert message.startswith("odd: weight 'w1' of shape [4, 4, 3, 3] has 1 NaN/Inf value(s)"), message
    _, report = convfuse.fuse_onnx(_qdq_conv())
    message = next(d.decline.message for d in report.declines if d.reason is Reason.NON_CONSTANT)
    assert "DequantizeLinear" in message and "quantized" in message
    _, report = convfuse.fuse_onnx(_too_large(), policy="always")
    message = next(d.decline.message for d in report.declines if d.reason is Reason.TOO_LARGE)
    assert "135,266,304 weight elements" in message


@pytest.mark.parametrize("case", sorted(c for c, v in CASES.items() if v[3]))
def test_command_line_merges_the_rest_and_verifies(tmp_path: Path, case: str) -> None:
    build, reason, policy, _ = CASES[case]
    src = tmp_path / "m.onnx"
    onnx.save_model(build(), src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    result = CliRunner().invoke(
        main, ["merge", str(src), "--json", "--policy", policy], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert reason.value in {d["reason"] for d in payload["declines"]}
    assert payload["merges"] and payload["output"] == str(tmp_path / "m.fused.onnx")
    assert any(n.startswith("verified: candidate matches") for n in payload["notes"]), payload["notes"]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


def test_model_onnx_runtime_cannot_run_is_not_written_unless_allowed(tmp_path: Path) -> None:
    """A custom-domain operator: the merge cannot be verified here, which is said, not hidden:
    exit 4 with one line and nothing written; --allow-unverified writes it with a warning;
    --in-place refuses to replace the input unverified."""
    src = tmp_path / "custom.onnx"
    onnx.save_model(_unknown_domain(), src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    refused = CliRunner().invoke(main, ["merge", str(src)], catch_exceptions=False)
    assert refused.exit_code == 4, refused.output
    line = refused.stderr.strip()
    assert line.startswith(f"convfuse: error: {src}: not verified: the input model cannot be run here")
    assert (
        "\n" not in line
        and "FancyOp" in line
        and line.endswith("nothing written (--allow-unverified writes it anyway)")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]
    assert (
        "kept    unsupported 1: " in refused.stdout
    )  # the report still prints (-v gives the reason in full)

    result = CliRunner().invoke(main, ["merge", str(src), "--allow-unverified"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    warning = result.stderr.strip()
    assert warning.startswith(f"convfuse: warning: {src}: not verified: the input model cannot be run here")
    assert (
        "\n" not in warning and "FancyOp" in warning and "written unverified (--allow-unverified)" in warning
    )
    assert (tmp_path / "custom.fused.onnx").exists()
    assert "kept    unsupported 1: " in result.stdout  # the summary counts it; -v says why
    listed = CliRunner().invoke(main, ["inspect", "-v", str(src)], catch_exceptions=False)
    assert "unsupported: 1 FancyOp node(s) of operator domain 'com.example'" in " ".join(
        listed.stdout.split()
    )
    in_place = CliRunner().invoke(main, ["merge", str(src), "--in-place"], catch_exceptions=False)
    assert in_place.exit_code == 4
    assert "--in-place replaces the input only after verification" in in_place.stderr
    both = CliRunner().invoke(
        main, ["merge", str(src), "--in-place", "--allow-unverified"], catch_exceptions=False
    )
    assert both.exit_code == 2 and "drop --allow-unverified" in both.stderr
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
