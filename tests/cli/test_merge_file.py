"""``convfuse.merge_file``: the library's merge of an ONNX file, with a typed verdict and exit code."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

import convfuse
from convfuse import files
from convfuse.errors import ExitCode, OutputError
from tests.support.onnx_builders import Graph


def _model_file(tmp_path: Path) -> Path:
    g = Graph(["N", 4, 8, 8])
    a = g.bn(g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1], bias=False), 4)
    b = g.bn(g.conv("x", 4, 4, 1, bias=False), 4)
    path = tmp_path / "m.onnx"
    onnx.save_model(g.model([g.node("Relu", [g.node("Add", [a, b])])]), path)
    return path


def test_a_right_merge_is_verified_and_written(tmp_path: Path) -> None:
    src = _model_file(tmp_path)
    result = convfuse.merge_file(src)
    assert result.written and result.exit_code is ExitCode.OK and result.error is None
    assert result.target == tmp_path / "m.fused.onnx" and result.target.exists()
    check = result.verification
    assert check.verdict is convfuse.Verdict.PASSED and check.result is not None and check.result.passed
    assert result.report.verification == check.detail == f"verified: {check.finding}"
    assert not check.finding.startswith("verified")


def test_a_wrong_merge_is_a_typed_failure_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twin: the same file fused wrongly fails the check, names the merge at fault, writes nothing."""
    src = _model_file(tmp_path)
    real = files.fuse_onnx

    def wrong(model, **kwargs):  # type: ignore[no-untyped-def]
        fused, report = real(model, **kwargs)
        init = next(t for t in fused.graph.initializer if t.dims and len(t.dims) == 4)
        w = numpy_helper.to_array(init).copy()
        w.flat[0] += 0.1
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        return fused, report

    monkeypatch.setattr(files, "fuse_onnx", wrong)
    result = convfuse.merge_file(src)
    assert not result.written and result.exit_code is ExitCode.VERIFY_FAILED
    assert result.verification.verdict is convfuse.Verdict.FAILED
    assert result.error is not None and result.error.startswith("verification failed: candidate DIFFERS")
    assert "wrong on its own" in result.error and result.error.endswith("; nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_skipped_verification_is_its_own_verdict(tmp_path: Path) -> None:
    result = convfuse.merge_file(_model_file(tmp_path), tmp_path / "out.onnx", verify=False)
    assert result.written and result.verification.verdict is convfuse.Verdict.SKIPPED
    assert result.verification.exit_code is ExitCode.OK and result.verification.result is None


def test_conflicting_options_and_unwritable_targets_raise(tmp_path: Path) -> None:
    src = _model_file(tmp_path)
    with pytest.raises(files.OptionConflictError, match="drop --no-verify"):
        convfuse.merge_file(src, in_place=True, verify=False)
    with pytest.raises(OutputError, match="is the input file") as caught:
        convfuse.merge_file(src, src)
    assert caught.value.path == str(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_cli_reports_the_input_before_a_bad_shape(tmp_path: Path) -> None:
    """As before the CLI became a caller of merge_file: a missing input wins over a bad --shape."""
    from click.testing import CliRunner

    from convfuse_cli.main import main

    missing = CliRunner().invoke(main, ["merge", str(tmp_path / "no.onnx"), "--shape", "x1x3"])
    assert missing.exit_code == 2 and "no.onnx: does not exist" in missing.stderr
    bad_shape = CliRunner().invoke(main, ["merge", str(_model_file(tmp_path)), "--shape", "x1x3"])
    assert bad_shape.exit_code == 2 and "is not NAME=DIMS" in bad_shape.stderr  # twin: a real input
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
