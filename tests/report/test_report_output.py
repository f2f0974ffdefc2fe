"""What ``merge`` and ``inspect`` print: the summary by default, ``-v`` for every line, ``--json``
for every detail. Snapshots of the samples (timings masked), a 200-merge model that stays short,
widths within 80 columns, colour only on a terminal.

Refresh the snapshots after an intended change with ``CONVFUSE_UPDATE_SNAPSHOTS=1 pytest
tests/report/test_report_output.py`` and review the diff.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from convfuse.decline import Decline, Reason
from convfuse.report import MergeKind, Report
from convfuse_cli import _run
from convfuse_cli.main import main
from tests.support.onnx_builders import Graph

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _mask(text: str) -> str:
    """Timings and verification errors vary from run to run and machine to machine."""
    text = re.sub(r"(?m)^time( +).*$", r"time\1<masked>", text)
    text = re.sub(r"max rel err [0-9.e+-]+", "max rel err <masked>", text)
    return text.replace(str(SAMPLES), "samples")


def _mask_json(text: str) -> str:
    payload = json.loads(text.replace(str(SAMPLES), "samples"))
    payload["timings"] = {stage: "<masked>" for stage in payload["timings"]}
    return json.dumps(payload, indent=2) + "\n"


def _snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("CONVFUSE_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}: run with CONVFUSE_UPDATE_SNAPSHOTS=1 and review it"
    assert text == path.read_text(), f"output differs from {path} (CONVFUSE_UPDATE_SNAPSHOTS=1 to refresh)"


@pytest.mark.parametrize("sample", ["repvgg", "convbn", "expandnet"])
def test_inspect_output_matches_the_snapshots(sample: str) -> None:
    path = str(SAMPLES / f"{sample}.onnx")
    default = _mask(_invoke("inspect", path))
    verbose = _mask(_invoke("inspect", "-v", path))
    _snapshot(f"{sample}.default.txt", default)
    _snapshot(f"{sample}.verbose.txt", verbose)
    _snapshot(f"{sample}.json", _mask_json(_invoke("inspect", "--json", path)))
    for text in (default, verbose):
        assert max(len(line) for line in text.splitlines()) <= 80
        assert "\x1b[" not in text  # no colour off a terminal


def test_merge_default_output_matches_the_snapshot(tmp_path: Path) -> None:
    src = tmp_path / "repvgg.onnx"
    shutil.copy(SAMPLES / "repvgg.onnx", src)
    text = _mask(_invoke("merge", str(src)).replace(str(tmp_path), "samples"))
    _snapshot("repvgg.merge.txt", text)
    lines = text.splitlines()
    assert lines[-1] == "wrote samples/repvgg.fused.onnx"
    # The verification line comes just before it (wrapped to 80 columns: continuations indented).
    start = max(i for i, line in enumerate(lines) if not line.startswith(" ") and i < len(lines) - 1)
    assert lines[start].startswith("verified: candidate matches")
    assert all(line.startswith("    ") for line in lines[start + 1 : -1])


def test_default_output_counts_kinds_and_verbose_lists_every_merge() -> None:
    path = str(SAMPLES / "repvgg.onnx")
    default, verbose = _invoke("inspect", path), _invoke("inspect", "-v", path)
    assert "merged  sum of branches 5" in default
    assert "dense/dense.0/Conv" not in default  # no per-merge lines by default
    # -v: every merge, under its block, in graph order (each block's region is one sum).
    blocks = [line for line in verbose.splitlines() if line.startswith("/features/")]
    assert blocks == [f"/features/features.{i}" for i in range(5)]
    listing = verbose.split("/features/features.1\n")[0]
    assert "merged sum: " in listing and "dense/dense.0/Conv" in listing
    assert verbose.count("\n  merged ") == 5


def _many_merges(tmp_path: Path, blocks: int = 208) -> Path:
    """``blocks`` conv+BN+ReLU blocks in stages of 20; every 26th conv output is also a graph
    output (that conv and its BN are kept: a decline). 208 blocks: 200 merges, 8 declines."""
    g = Graph([1, 4, 6, 6])
    y, outputs = "x", []
    for i in range(blocks):
        scope = f"/stages/stage{i // 20}/block{i}"
        conv = g.conv(y, 4, 4, 3, pads=[1, 1, 1, 1], name=f"{scope}/conv/Conv")
        if i % 26 == 0:
            outputs.append(conv)
        y = g.node("Relu", [g.bn(conv, 4, name=f"{scope}/bn/BatchNormalization")], name=f"{scope}/Relu")
    path = tmp_path / "many.onnx"
    onnx.save_model(g.model([y, *outputs]), path)
    return path


def test_a_200_merge_model_prints_under_30_lines(tmp_path: Path) -> None:
    path = str(_many_merges(tmp_path))
    default = _invoke("inspect", path)
    verbose = _invoke("inspect", "-v", path)
    payload = json.loads(_invoke("inspect", "--json", path))
    assert len(payload["merges"]) == 200 and len(payload["declines"]) == 8
    assert len(default.splitlines()) < 30, default
    assert "merged  conv+bn 200" in default
    assert "kept    graph-output 8: " in default and "and 5 more" in " ".join(default.split())
    assert len(verbose.splitlines()) >= 200  # -v still lists every one
    assert max(len(line) for line in (default + verbose).splitlines()) <= 80


def test_merge_kinds_are_a_fixed_vocabulary() -> None:
    cases = {
        "conv+bn": MergeKind.CONV_BN,
        "bn+conv+bn": MergeKind.CONV_BN,
        "conv+mul+add": MergeKind.CONV_AFFINE,
        "conv+affine": MergeKind.CONV_AFFINE,  # torch
        "pad+conv": MergeKind.PAD,
        "conv+conv+conv": MergeKind.CHAIN,
        "avgpool+conv": MergeKind.CHAIN,
        "chain": MergeKind.CHAIN,  # torch
        "sum": MergeKind.SUM,
        "sum+chain": MergeKind.SUM,  # torch
        "identity": MergeKind.IDENTITY,
    }
    for kind, expected in cases.items():
        assert MergeKind.of(kind) is expected, kind
    # Negative twins: what is not a conv merge of a known shape is not silently counted as one.
    assert MergeKind.of("bn+mul") is MergeKind.OTHER
    assert MergeKind.of("conv+gelu") is MergeKind.OTHER


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert _run.use_colour(Tty()) and not _run.use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not _run.use_colour(Tty())
    report = Report(verification="verified: candidate matches; max rel err 1e-7")
    report.declined(("a",), Decline(Reason.SHARED_TENSOR, "read twice"))
    assert "\x1b[32mverified" in report.summary(colour=True)
    assert "\x1b[" not in report.summary()
