"""Identity nodes: removed (readers read the input), also between layers that then merge."""

from __future__ import annotations

import onnx
from onnx import helper

import convfuse
from convfuse.decline import Reason
from tests.support.onnx_builders import Graph, fuse_checked, ops, reasons


def test_identity_between_conv_and_batchnorm_is_removed_and_they_merge() -> None:
    g = Graph([1, 3, 6, 6])
    y = g.conv("x", 3, 4, 3, pads=[1, 1, 1, 1])
    y = g.node("Identity", [y])
    y = g.bn(y, 4)
    y = g.node("Relu", [y])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert [m.kind for m in report.merges] == ["identity", "conv+bn"]


def test_identity_of_a_constant_weight() -> None:
    """Exporters deduplicate equal initializers and read them through Identity nodes."""
    g = Graph([1, 3, 6, 6])
    y = g.conv("x", 3, 4, 1)
    gamma = g.node("Identity", [g.const([1.0, 2.0, 3.0, 4.0], "gamma")])
    rest = [g.const([0.1] * 4), g.const([0.2] * 4), g.const([1.5] * 4)]
    y = g.node("BatchNormalization", [y, gamma, *rest])
    fused, _ = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}


def test_identity_on_graph_output_renames_the_producer() -> None:
    g = Graph([1, 3, 6, 6])
    y = g.conv("x", 3, 4, 1)
    y = g.node("Identity", [g.bn(y, 4)])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}
    assert fused.graph.node[0].output[0] == y


def test_identity_from_graph_input_to_graph_output_is_kept() -> None:
    """Negative twin: the output name must stay and the input has no producer to rename."""
    g = Graph([1, 3, 6, 6])
    i = g.node("Identity", ["x"])
    y = g.conv("x", 3, 4, 1)
    fused, report = fuse_checked(g.model([y, i]))
    assert ops(fused) == {"Conv": 1, "Identity": 1}
    assert reasons(report) == {Reason.GRAPH_OUTPUT}


def test_identity_read_inside_a_subgraph_is_renamed_there() -> None:
    g = Graph([1, 3, 6, 6])
    y = g.conv("x", 3, 3, 1)
    alias = g.node("Identity", [y])
    then_out = helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, [1, 3, 6, 6])
    then_graph = helper.make_graph([helper.make_node("Relu", [alias], ["t_out"])], "then", [], [then_out])
    else_graph = helper.make_graph([helper.make_node("Neg", [alias], ["t_out"])], "else", [], [then_out])
    cond = g.const([True], "cond", bool)
    out = g.node("If", [cond], then_branch=then_graph, else_branch=else_graph)
    model = g.model([out])
    fused, _ = fuse_checked(model)
    assert ops(fused) == {"Conv": 1, "If": 1}
    branch = next(a.g for a in fused.graph.node[1].attribute if a.name == "then_branch")
    assert branch.node[0].input[0] == y


def test_identity_pass_through_keeps_interface() -> None:
    g = Graph([1, 3, 6, 6])
    y = g.node("Identity", ["x"])
    y = g.conv(y, 3, 4, 1)
    fused, report = convfuse.fuse_onnx(g.model([y]))
    assert ops(fused) == {"Conv": 1}
    assert fused.graph.node[0].input[0] == "x"
