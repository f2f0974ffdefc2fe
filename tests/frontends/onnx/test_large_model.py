"""A model over 2 GiB (external data) merges, verifies and is written with bounded memory.

Slow (about a minute, 8 GiB of disk): ``python -m pytest -m slow tests/frontends/onnx/test_large_model.py``.
``python -m benchmarks.large_model`` prints the same figures beside a bare onnx.load + onnx.save.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import pytest

from benchmarks.large_model import _BASELINE, _MERGE, NEED_FREE_BYTES, build_large_model, measure
from convfuse.frontends.onnx.io import MAX_PROTOBUF

pytestmark = pytest.mark.slow


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def test_model_over_2_gib_merges_verifies_with_bounded_memory(tmp_path: Path) -> None:
    if shutil.disk_usage(tmp_path).free < NEED_FREE_BYTES:
        pytest.skip(f"needs {NEED_FREE_BYTES / 2**30:.0f} GiB free in {tmp_path}")
    src = tmp_path / "large.onnx"
    total = build_large_model(src, gib=2.1)
    assert total > MAX_PROTOBUF
    inputs = {p.name: _sha256(p) for p in tmp_path.iterdir()}
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    merged = measure(_MERGE, "merge", str(src), "-o", str(out), "--json")
    baseline = measure(_BASELINE, str(src), str(tmp_path / "copy.onnx"))
    figures = {k: v for k, v in merged.items() if k != "stdout"}
    print(f"\nmodel {total / 2**30:.2f} GiB: merge {figures}, load+save {baseline}")
    payload = json.loads(merged["stdout"])
    assert any(n.startswith("verified: candidate matches") for n in payload["notes"]), payload["notes"]
    # One copy of the weights plus working space; a second copy would be >= 2x.
    assert merged["peak_rss_bytes"] < 1.6 * total
    assert merged["peak_rss_bytes"] < 1.4 * baseline["peak_rss_bytes"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    assert sum(n.op_type == "BatchNormalization" for n in header.graph.node) == 0
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    onnx.checker.check_model(str(out))
    assert {p.name: _sha256(p) for p in tmp_path.iterdir() if p.name in inputs} == inputs


def test_in_place_on_a_large_model(tmp_path: Path) -> None:
    if shutil.disk_usage(tmp_path).free < NEED_FREE_BYTES:
        pytest.skip(f"needs {NEED_FREE_BYTES / 2**30:.0f} GiB free in {tmp_path}")
    src = tmp_path / "large.onnx"
    build_large_model(src, gib=2.1)
    merged = measure(_MERGE, "merge", str(src), "--json", "--in-place")
    payload = json.loads(merged["stdout"])
    assert any(n.startswith("verified: candidate matches") for n in payload["notes"]), payload["notes"]
    assert payload["output"] == str(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.onnx", "large.onnx.data"]
    header = onnx.load(str(src), load_external_data=False)
    assert sum(n.op_type == "BatchNormalization" for n in header.graph.node) == 0
