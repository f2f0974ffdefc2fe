"""If/Loop bodies are walked: their linear runs merge too, with outer-scope weights."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.support.onnx_builders import Graph, fuse_checked, ops


def _branch(name: str, x: str, out: str, weights: list[str], seed: int) -> tuple:
    """conv (outer-scope weight) -> BN (local constants) -> Relu."""
    rng = np.random.default_rng(seed)
    local = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), f"{name}_g"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), f"{name}_b"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), f"{name}_m"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(np.float32), f"{name}_v"),
    ]
    nodes = [
        helper.make_node("Conv", [x, *weights], [f"{name}_c"], name=f"{name}_conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", [f"{name}_c", *[t.name for t in local]], [f"{name}_bn"], name=f"{name}_bn"
        ),
        helper.make_node("Relu", [f"{name}_bn"], [out], name=f"{name}_relu"),
    ]
    value = helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4, 6, 6])
    return helper.make_graph(nodes, name, [], [value], local)


def test_if_branches_are_walked() -> None:
    g = Graph([1, 3, 6, 6])
    w = g.const(g.rng.standard_normal((4, 3, 3, 3)), "w")
    b = g.const(g.rng.standard_normal(4), "b")
    cond = g.const([True], "cond", bool)
    then_graph = _branch("then", "x", "out_t", [w, b], 1)
    else_graph = _branch("else", "x", "out_e", [w], 2)
    y = g.node("If", [cond], then_branch=then_graph, else_branch=else_graph)
    model = g.model([y])
    fused, report = fuse_checked(model)
    for attr in fused.graph.node[0].attribute:
        assert [n.op_type for n in attr.g.node] == ["Conv", "Relu"]
        assert not attr.g.initializer[0].name.endswith(("_g", "_b", "_m", "_v"))  # BN constants dropped
        assert len(attr.g.initializer) in (1, 2)
    assert "walked 2 subgraph(s)" in " ".join(report.notes)
    # The outer weights are still used by nobody once both branches merged: dropped too.
    assert {t.name for t in fused.graph.initializer} == {cond}


def test_loop_body_is_walked() -> None:
    g = Graph([1, 4, 6, 6])
    w = g.const(g.rng.standard_normal((4, 4, 1, 1)) / 2, "w")
    trip = g.const(np.array(2), "trip", np.int64)
    body_in = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4, 6, 6]),
    ]
    body_out = [
        helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 4, 6, 6]),
    ]
    scale = numpy_helper.from_array(np.full((4, 1, 1), 0.5, np.float32), "half")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Conv", ["h", w], ["hc"], name="body_conv"),
            helper.make_node("Mul", ["hc", "half"], ["hm"], name="body_mul"),
            helper.make_node("Tanh", ["hm"], ["h_out"]),
        ],
        "body",
        body_in,
        body_out,
        [scale],
    )
    y = g.node("Loop", [trip, "", "x"], body=body)
    fused, _ = fuse_checked(g.model([y]))
    loop = fused.graph.node[0]
    body_ops = [n.op_type for n in loop.attribute[0].g.node]
    assert body_ops == ["Identity", "Conv", "Tanh"]
    assert ops(fused) == {"Loop": 1}
