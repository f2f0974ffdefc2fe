"""float32, float16 and float64 models merge (weights computed in float64, cast once); bfloat16
declines with a typed reason."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import convfuse
from convfuse.decline import Reason
from tests.support.onnx_builders import Graph, fuse_checked, ops, reasons


def _repvgg_expand(elem: int) -> Graph:
    g = Graph([1, 4, 9, 9], elem=elem)
    a = g.bn(g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1], bias=False), 4)
    b = g.bn(g.conv("x", 4, 4, 1, bias=False), 4)
    s = g.node("Relu", [g.node("Add", [a, b])])
    y = g.conv(g.conv(s, 4, 16, 1, bias=False), 16, 4, 3, pads=[1, 1, 1, 1])
    g.out = y  # type: ignore[attr-defined]
    return g


@pytest.mark.parametrize(
    "elem, tol", [(TensorProto.FLOAT, 1e-5), (TensorProto.FLOAT16, 5e-3), (TensorProto.DOUBLE, 1e-12)]
)
def test_float_types_merge(elem: int, tol: float) -> None:
    g = _repvgg_expand(elem)
    model = g.model([g.out])  # type: ignore[attr-defined]
    fused, report = fuse_checked(model, tol=tol)
    assert ops(fused) == {"Conv": 2, "Relu": 1}
    types = {t.data_type for t in fused.graph.initializer}
    assert types == {elem}


def test_float16_batchnorm_with_float32_statistics() -> None:
    """BatchNormalization-15 allows float32 statistics on a float16 tensor."""
    g = Graph([1, 4, 6, 6], elem=TensorProto.FLOAT16)
    y = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1])
    stats = [g.const(v, "s", np.float32) for v in (np.ones(4), np.zeros(4), np.full(4, 0.1), np.full(4, 2.0))]
    y = g.node("BatchNormalization", [y, *stats])
    fused, _ = fuse_checked(g.model([y], opset=15), tol=5e-3)
    assert ops(fused) == {"Conv": 1}
    assert {t.data_type for t in fused.graph.initializer} == {TensorProto.FLOAT16}


def test_bfloat16_declines_with_dtype() -> None:
    g = Graph([1, 4, 6, 6])
    w = helper.make_tensor("wbf", TensorProto.BFLOAT16, [4, 4, 1, 1], np.ones(16, np.float32).tolist())
    g.inits.append(w)
    g.inputs[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 4, 6, 6]))
    g.elem = TensorProto.BFLOAT16
    y = g.node("Conv", ["x", "wbf"])
    w2 = helper.make_tensor("wbf2", TensorProto.BFLOAT16, [4, 4, 1, 1], np.ones(16, np.float32).tolist())
    g.inits.append(w2)
    y = g.node("Conv", [y, "wbf2"])
    model = g.model([y], opset=22)  # Conv takes bfloat16 from opset 22
    fused, report = convfuse.fuse_onnx(model)
    assert ops(fused) == {"Conv": 2}
    assert reasons(report) == {Reason.DTYPE}


def test_float16_overflow_declines() -> None:
    """Merged weights that do not fit float16 are a decline, not an inf in the model."""
    g = Graph([1, 2, 4, 4], elem=TensorProto.FLOAT16)
    big = g.const(np.full((2, 2, 1, 1), 300.0), "w")
    big2 = g.const(np.full((2, 2, 1, 1), 300.0), "w")
    y = g.node("Conv", [g.node("Conv", ["x", big]), big2])
    fused, report = convfuse.fuse_onnx(g.model([y]))
    assert ops(fused) == {"Conv": 2}
    assert reasons(report) == {Reason.NON_FINITE}
    assert not any(np.isinf(numpy_helper.to_array(t)).any() for t in fused.graph.initializer)
