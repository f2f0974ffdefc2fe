"""Random ONNX graphs through the ONNX front end: checker-valid, runnable, same outputs, no growth.

500 graphs through the API and 10 through the command line per CI run; ``-m slow`` runs a
longer search.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from onnx import helper

import convfuse
from convfuse_cli.main import main
from tests.support.onnx_graphs import random_model

#: Largest relative error of the fused model per input type: float16 rounds each layer's output
#: in the original but not inside a merged conv, so the two differ by a few float16 ulps.
_TOLERANCE = {np.float32: 1e-4, np.float16: 2e-2}

ort.set_default_logger_severity(3)


def _session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _loads(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> bool:
    return _load_error(model, level) is None


def _load_error(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> str | None:
    try:
        _session(model, level)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several unrelated types
        return str(exc)
    return None


def _ort_layout_bug(model: onnx.ModelProto) -> bool:
    """ONNX Runtime 1.31's layout optimizer (ORT_ENABLE_LAYOUT and up) fuses an Add into a Conv
    whose output is also a graph output, then fails to load the model: "Failed to find node
    output ... producing output: NAME". The graph is valid (it loads at ORT_ENABLE_EXTENDED and
    computes the right values); a hand-written 6-node graph with that shape fails the same way."""
    error = _load_error(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL) or ""
    match = re.search(
        r"Failed to find node output or a constant initializer producing output: (\S+?)\.?$", error
    )
    if match is None or not _loads(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED):
        return False
    name = match.group(1)
    producers = [n for n in model.graph.node if name in n.output]
    return (
        name in {o.name for o in model.graph.output}
        and len(producers) == 1
        and producers[0].op_type == "Conv"
        and any(n.op_type in ("Add", "Sum") and name in n.input for n in model.graph.node)
    )


def _check(model: onnx.ModelProto) -> None:
    fused, report = convfuse.fuse_onnx(model)
    onnx.checker.check_model(fused, full_check=True)
    assert len(fused.graph.node) <= len(model.graph.node), report.to_text()
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    assert fused.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in fused.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]

    # Compare functions with ONNX Runtime's optimizer off (it has bugs of its own, see below).
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    tensor_type = model.graph.input[0].type.tensor_type
    shape = [d.dim_value for d in tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).type
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    ref = _session(model, off).run(None, {"x": x})
    out = _session(fused, off).run(None, {"x": x})
    for name, r, o in zip([v.name for v in model.graph.output], ref, out):
        assert r.shape == o.shape, name
        scale = max(float(np.abs(r.astype(np.float64)).max()), 1e-30)
        err = float(np.abs(r.astype(np.float64) - o.astype(np.float64)).max()) / scale
        assert err <= _TOLERANCE[dtype], f"{name}: relative error {err:.2e}\n{report.to_text()}"
    # A fused model must load wherever the original does with every optimization on. (ONNX
    # Runtime 1.31 fails to load some valid graphs at ORT_ENABLE_ALL, e.g. a Conv output
    # that is both a graph output and consumed elsewhere; those originals are not held against us,
    # nor a fused graph that meets the same bug, see _ort_layout_bug.)
    full = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _loads(model, full):
        assert _loads(fused, full) or _ort_layout_bug(fused), report.to_text()


@settings(max_examples=500)
@given(model=random_model())
def test_random_graphs_fuse_exactly(model: onnx.ModelProto) -> None:
    _check(model)


@pytest.mark.slow
@settings(max_examples=5000)
@given(model=random_model(max_ops=14))
def test_random_graphs_fuse_exactly_long(model: onnx.ModelProto) -> None:
    _check(model)


@settings(max_examples=10)
@given(model=random_model(max_ops=6))
def test_random_graphs_through_the_command_line(model: onnx.ModelProto) -> None:
    """``convfuse merge`` with verification on: exit 0, a fused file, the input untouched."""
    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "random.onnx"
        onnx.save_model(model, src)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        result = CliRunner().invoke(main, ["merge", str(src), "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert any(n.startswith("verified: candidate matches") for n in payload["notes"]), payload["notes"]
        assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
        fused = onnx.load(str(Path(folder) / "random.fused.onnx"))
        assert len(fused.graph.node) <= len(model.graph.node)
