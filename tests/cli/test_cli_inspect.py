"""``convfuse inspect``: the same plan and report as ``merge``, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from convfuse_cli.main import main

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def test_inspect_reports_like_merge_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "repvgg.onnx"
    shutil.copy(SAMPLES / "repvgg.onnx", src)
    runner = CliRunner()
    seen = runner.invoke(main, ["inspect", str(src), "--json"], catch_exceptions=False)
    assert seen.exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["repvgg.onnx"]
    done = runner.invoke(main, ["merge", str(src), "--json", "--no-verify"], catch_exceptions=False)
    planned, merged = json.loads(seen.stdout), json.loads(done.stdout)
    for key in ("before", "after", "merges", "declines"):
        assert planned[key] == merged[key]


def test_inspect_text_has_summary_and_reasons() -> None:
    result = CliRunner().invoke(main, ["inspect", str(SAMPLES / "convbn.onnx")], catch_exceptions=False)
    assert result.exit_code == 0
    assert "BatchNormalization" in result.stdout and "not-profitable" in result.stdout
    assert "wrote" not in result.stdout


def test_inspect_policy_always() -> None:
    result = CliRunner().invoke(
        main, ["inspect", str(SAMPLES / "convbn.onnx"), "--policy", "always", "--json"]
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout)["after"]["op_counts"]["Conv"] < 4
