"""``convfuse merge``: output, report, exit codes, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from convfuse import files
from convfuse_cli.main import main
from tests.support.onnx_builders import Graph, check_fused, ops

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_file(tmp_path: Path, name: str = "model.onnx", blocks: int = 1, c: int = 4) -> Path:
    g = Graph(["N", c, 8, 8])
    y = "x"
    for _ in range(blocks):
        a = g.bn(g.conv(y, c, c, 3, pads=[1, 1, 1, 1], bias=False), c)
        b = g.bn(g.conv(y, c, c, 1, bias=False), c)
        y = g.node("Relu", [g.node("Add", [a, b])])
    model = g.model([y])
    onnx.helper.set_model_props(model, {"origin": "test"})
    path = tmp_path / name
    onnx.save_model(model, path)
    return path


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_merge_writes_beside_the_input_and_keeps_the_input(tmp_path: Path) -> None:
    src = _model_file(tmp_path)
    digest = _digest(src)
    result = _invoke("merge", str(src))
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "model.fused.onnx"
    assert out.exists() and _digest(src) == digest
    fused, original = onnx.load(str(out)), onnx.load(str(src))
    check_fused(original, fused)
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert fused.ir_version == original.ir_version
    assert list(fused.opset_import) == list(original.opset_import)
    assert list(fused.metadata_props) == list(original.metadata_props)
    text = result.stdout
    for word in ("Conv", "BatchNormalization", "Add", "parameters", "MACs", "wrote"):
        assert word in text
    assert "merged  sum of branches 1" in text  # one line per merge kind, with its count
    assert "verified: candidate matches; max rel err" in text


def test_merge_output_option_and_json(tmp_path: Path) -> None:
    src = _model_file(tmp_path)
    out = tmp_path / "sub" / "out.onnx"
    out.parent.mkdir()
    result = _invoke("merge", str(src), "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)  # nothing but JSON on stdout
    assert payload["output"] == str(out)
    assert payload["before"]["op_counts"]["BatchNormalization"] == 2
    assert payload["after"]["op_counts"]["BatchNormalization"] == 0
    assert payload["merges"][-1]["kind"] == "sum"
    assert out.exists()


def test_policy_always_merges_what_flops_declines(tmp_path: Path) -> None:
    g = Graph([1, 8, 8, 8])
    y = g.conv(g.conv("x", 8, 8, 3, group=8, pads=[1, 1, 1, 1], bias=False), 8, 16, 1)
    src = tmp_path / "dw.onnx"
    onnx.save_model(g.model([y]), src)
    flops = _invoke("merge", str(src), "--json", "-o", str(tmp_path / "a.onnx"))
    always = _invoke("merge", str(src), "--json", "--policy", "always", "-o", str(tmp_path / "b.onnx"))
    assert json.loads(flops.stdout)["declines"][0]["reason"] == "not-profitable"
    assert json.loads(always.stdout)["after"]["op_counts"]["Conv"] == 1


def _break_first_conv(fused: onnx.ModelProto) -> None:
    """Perturb one weight of the first Conv by 1e-2 of its size: a merge that is subtly wrong."""
    conv = next(n for n in fused.graph.node if n.op_type == "Conv")
    init = next(t for t in fused.graph.initializer if t.name == conv.input[1])
    w = onnx.numpy_helper.to_array(init).copy()
    w.flat[0] += 1e-2 * float(abs(w).max())
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))


def break_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``convfuse merge`` fuse subtly wrongly (:func:`_break_first_conv` on every result)."""
    real_fuse = files.fuse_onnx

    def wrong_fuse(model, **kwargs):  # type: ignore[no-untyped-def]
        fused, report = real_fuse(model, **kwargs)
        _break_first_conv(fused)
        return fused, report

    monkeypatch.setattr(files, "fuse_onnx", wrong_fuse)


def test_failed_verification_exits_1_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _model_file(tmp_path)
    break_merges(monkeypatch)
    result = _invoke("merge", str(src))
    assert result.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"convfuse: error: {src}: verification failed: candidate DIFFERS")
    assert "wrong on its own" in result.stderr  # the verifier names the merge responsible
    assert "verified: candidate DIFFERS" in result.stdout  # the report still prints


def test_verification_passes_on_a_right_merge(tmp_path: Path) -> None:
    """Twin: the real merge verifies, and the report says how closely."""
    src = _model_file(tmp_path)
    result = _invoke("merge", str(src))
    assert result.exit_code == 0, result.output
    assert "verified: candidate matches; max rel err" in result.stdout


def test_no_verify_skips_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _model_file(tmp_path)

    def boom(ref, cand):  # type: ignore[no-untyped-def]
        raise AssertionError("must not verify")

    monkeypatch.setattr(files, "verify_onnx", boom)
    result = _invoke("merge", str(src), "--no-verify")
    assert result.exit_code == 0
    assert "verification skipped (--no-verify)" in result.stdout


@pytest.mark.parametrize("kind", ["missing", "directory", "garbage", "empty", "not-onnx-protobuf"])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.onnx"
    if kind == "directory":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(os.urandom(257) + b"\xff\xff\xff")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-onnx-protobuf":
        path.write_bytes(b"\x12\x03abc")  # parses as a ModelProto with only a producer name
    for command in ("merge", "inspect"):
        result = _invoke(command, str(path))
        assert result.exit_code == 2, (command, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"convfuse: error: {path}: "), result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert result.stdout == ""


def test_output_problems_exit_2(tmp_path: Path) -> None:
    src = _model_file(tmp_path)
    digest = _digest(src)
    for target in (src, tmp_path / "missing-dir" / "out.onnx", tmp_path):
        result = _invoke("merge", str(src), "-o", str(target))
        assert result.exit_code == 2, target
        assert len(result.stderr.strip().splitlines()) == 1
    assert _digest(src) == digest


def test_usage_error_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["merge"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["merge", "x.onnx", "--policy", "fastest"])
    assert result.exit_code == 2


def test_progress_goes_to_stderr_for_large_models(tmp_path: Path) -> None:
    src = _model_file(tmp_path, blocks=60)  # 60 blocks x 6 nodes > 300 nodes
    result = _invoke("merge", str(src), "--json", "--no-verify")
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)
    assert "round" in result.stderr and result.stderr.startswith("convfuse: [")
    small = _invoke("merge", str(_model_file(tmp_path, "small.onnx")), "--json", "--no-verify")
    assert small.stderr == ""


def _console_script() -> str | None:
    here = Path(sys.executable).parent
    return shutil.which("convfuse", path=str(here))


@pytest.mark.parametrize("sample", ["repvgg", "expandnet", "convbn"])
def test_each_sample_merges(tmp_path: Path, sample: str) -> None:
    src = SAMPLES / f"{sample}.onnx"
    digest = _digest(src)
    out = tmp_path / f"{sample}.fused.onnx"
    result = _invoke("merge", str(src), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert _digest(src) == digest
    fused, original = onnx.load(str(out)), onnx.load(str(src))
    check_fused(original, fused)
    rings = sum("border_ring" in t.name for t in fused.graph.initializer)  # issue 14: Conv + Add(ring)
    assert ops(fused)["BatchNormalization"] == 0 and ops(fused)["Add"] == rings
    assert rings == (1 if sample == "expandnet" else 0)
    assert ops(fused)["Conv"] <= ops(original)["Conv"]
    assert len(fused.graph.node) < len(original.graph.node)


def test_real_process_with_the_console_script(tmp_path: Path) -> None:
    """One real run of the installed command (``python -m convfuse_cli.main`` if not installed)."""
    script = shutil.which("convfuse", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "convfuse_cli.main"]
    src = tmp_path / "repvgg.onnx"
    shutil.copy(SAMPLES / "repvgg.onnx", src)
    digest = _digest(src)
    done = subprocess.run([*command, "merge", str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and f"wrote {tmp_path / 'repvgg.fused.onnx'}" in done.stdout
    assert _digest(src) == digest
    check_fused(onnx.load(str(src)), onnx.load(str(tmp_path / "repvgg.fused.onnx")))
    bad = subprocess.run(
        [*command, "merge", str(tmp_path / "nope.onnx")], capture_output=True, text=True, timeout=300
    )
    assert (
        bad.returncode == 2 and bad.stderr == f"convfuse: error: {tmp_path / 'nope.onnx'}: does not exist\n"
    )


def test_external_data_model_is_written_with_external_data(tmp_path: Path) -> None:
    src_model = onnx.load(str(_model_file(tmp_path, "plain.onnx", c=8)))  # merged weight 2 KiB
    src = tmp_path / "ext.onnx"
    onnx.save_model(src_model, src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    result = _invoke("merge", str(src))
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "ext.fused.onnx"
    assert (tmp_path / "ext.fused.onnx.data").exists()
    assert any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.load(str(out), load_external_data=False).graph.initializer
    )
    check_fused(onnx.load(str(src)), onnx.load(str(out)))
    assert {name: _digest(tmp_path / name) for name in before} == before


def test_float64_model_verifies_on_the_reference_evaluator(tmp_path: Path) -> None:
    """ONNX Runtime has no float64 Conv on CPU: verification still runs, and says how."""
    g = Graph([1, 3, 6, 6], elem=onnx.TensorProto.DOUBLE)
    y = g.bn(g.conv("x", 3, 4, 3, pads=[1, 1, 1, 1]), 4)
    src = tmp_path / "f64.onnx"
    onnx.save_model(g.model([y]), src)
    result = _invoke("merge", str(src))
    assert result.exit_code == 0, result.output
    assert "verified: candidate matches" in result.stdout
    fused = onnx.load(tmp_path / "f64.fused.onnx")
    assert ops(fused) == {"Conv": 1} and fused.graph.initializer[0].data_type == onnx.TensorProto.DOUBLE
