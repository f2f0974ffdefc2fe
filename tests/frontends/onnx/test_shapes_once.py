"""The importer infers shapes once per ``fuse_onnx`` pass: the fused model's statistics reuse the
shapes inferred before fusing (merged convs write the tensors they replace). The prepasses
(``frontends/onnx/fold.py``, ``border.py``) still infer their own."""

from __future__ import annotations

import onnx
import pytest

import convfuse
from convfuse.frontends.onnx import api as onnx_api
from convfuse.frontends.onnx import stats as onnx_stats
from tests.support.onnx_builders import Graph


def _model() -> onnx.ModelProto:
    g = Graph([2, 4, 8, 8])
    a = g.bn(g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1], bias=False), 4)
    b = g.bn(g.conv("x", 4, 4, 1, bias=False), 4)
    return g.model([g.node("Relu", [g.node("Add", [a, b])])])


def _count_inference(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = onnx_stats.infer_shapes

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_api, "infer_shapes", counting)
    monkeypatch.setattr(onnx_stats, "infer_shapes", counting)
    return calls


def test_one_inference_per_pass_and_the_same_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_inference(monkeypatch)
    fused, report = convfuse.fuse_onnx(_model())
    assert len(calls) == 1
    assert report.merges and report.after.macs is not None
    monkeypatch.undo()
    fresh = onnx_stats.model_stats(fused)  # infers the fused model's shapes itself
    assert (report.after.macs, report.after.params) == (fresh.macs, fresh.params)


def test_a_conv_output_new_to_the_shapes_is_inferred_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twin: shapes that miss a Conv output are not reused (they would leave its MACs unknown)."""
    model = _model()
    shapes, _ = onnx_stats.infer_shapes(model)
    assert onnx_stats._knows_conv_outputs(model, shapes)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del shapes[conv.output[0]]
    assert not onnx_stats._knows_conv_outputs(model, shapes)
    assert onnx_stats.model_stats(model, shapes).macs is None  # what reusing them would report
