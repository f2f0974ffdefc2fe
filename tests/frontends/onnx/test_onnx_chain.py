"""Conv -> Conv chains in ONNX graphs: merged when exact and profitable, declined with a reason."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from convfuse.border_map import border_merges
from convfuse.decline import Reason
from tests.support.onnx_builders import Graph, fuse_checked, ops, reasons


def _expand_block(opset: int = 17, bias_first: bool = False, stride: int = 1) -> tuple:
    """ExpandNet-style 1x1 (C -> 4C) -> 3x3 (4C -> 4C, pad 1) -> 1x1 (4C -> C), then Relu."""
    g = Graph([1, 4, 10, 10])
    y = g.conv("x", 4, 16, 1, bias=bias_first)
    y = g.conv(y, 16, 16, 3, pads=[1, 1, 1, 1], strides=[stride, stride])
    y = g.conv(y, 16, 4, 1)
    y = g.node("Relu", [y])
    return g.model([y], opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_expand_chain_merges_into_one_conv(opset: int) -> None:
    model = _expand_block(opset)
    fused, report = fuse_checked(model)
    assert ops(fused)["Conv"] == 1
    assert [m.kind for m in report.merges] == ["conv+conv+conv"]
    assert "padding case 1" in report.merges[0].note
    assert report.after.macs < report.before.macs


def test_strided_chain_merges() -> None:
    fused, _ = fuse_checked(_expand_block(stride=2))
    assert ops(fused)["Conv"] == 1
    conv = fused.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    assert "auto_pad" not in attrs


def test_biased_pointwise_before_padded_conv_declines_case_2() -> None:
    """Negative twin: the first 1x1 has a bias, so the 3x3's zero border differs (case 2):
    declined by case 1 alone; with the border correction (issue 14) one conv plus the ring."""
    with border_merges(False):
        fused, report = fuse_checked(_expand_block(bias_first=True))
    assert Reason.PADDED_AFTER_BIASED_POINTWISE in reasons(report)
    # The 3x3 and the last 1x1 still merge: two convs remain.
    assert ops(fused)["Conv"] == 2
    fused, report = fuse_checked(_expand_block(bias_first=True))
    assert (ops(fused)["Conv"], ops(fused)["Add"]) == (1, 1) and "padding case 2" in report.merges[0].note


def test_spatial_conv_before_padded_conv_declines_case_3() -> None:
    g = Graph([1, 4, 10, 10])
    y = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1])
    y = g.conv(y, 4, 4, 3, pads=[1, 1, 1, 1])
    model = g.model([y])
    fused, report = fuse_checked(model, policy="always")
    assert ops(fused)["Conv"] == 2
    assert reasons(report) == {Reason.PADDED_AFTER_SPATIAL}


def test_unpadded_spatial_chain_merges_under_always() -> None:
    g = Graph([1, 4, 12, 12])
    y = g.conv("x", 4, 4, 3)
    y = g.conv(y, 4, 4, 3, dilations=[2, 2])
    model = g.model([y])
    fused, report = fuse_checked(model, policy="always")
    assert ops(fused)["Conv"] == 1
    # The default policy declines it: a 7x7 costs more than two 3x3.
    fused, report = fuse_checked(model)
    assert ops(fused)["Conv"] == 2
    assert reasons(report) == {Reason.NOT_PROFITABLE}


def test_depthwise_then_pointwise_is_not_profitable() -> None:
    g = Graph([1, 8, 10, 10])
    y = g.conv("x", 8, 8, 3, group=8, pads=[1, 1, 1, 1], bias=False)
    y = g.conv(y, 8, 16, 1)
    model = g.model([y])
    fused, report = fuse_checked(model)
    assert ops(fused)["Conv"] == 2
    assert reasons(report) == {Reason.NOT_PROFITABLE}
    fused, report = fuse_checked(model, policy="always")
    assert ops(fused)["Conv"] == 1


def test_shared_intermediate_tensor_is_not_merged_away() -> None:
    g = Graph([1, 4, 8, 8])
    a = g.conv("x", 4, 8, 1)
    b = g.conv(a, 8, 4, 1)
    c = g.node("Relu", [a])
    model = g.model([b, c])
    fused, report = fuse_checked(model)
    assert ops(fused)["Conv"] == 2
    assert reasons(report) == {Reason.SHARED_TENSOR}


def test_graph_output_is_not_merged_away() -> None:
    g = Graph([1, 4, 8, 8])
    a = g.conv("x", 4, 8, 1)
    b = g.conv(a, 8, 4, 1)
    model = g.model([b, a])
    fused, report = fuse_checked(model)
    assert ops(fused)["Conv"] == 2
    assert reasons(report) == {Reason.GRAPH_OUTPUT}


def test_weight_from_graph_input_is_non_constant() -> None:
    g = Graph([1, 4, 8, 8])
    w = helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [8, 4, 1, 1])
    a = g.node("Conv", ["x", "w_in"])
    b = g.conv(a, 8, 4, 1)
    model = g.model([b], extra_inputs=[w])
    fused, report = convfuse_fuse(model)
    assert ops(fused)["Conv"] == 2
    assert reasons(report) == {Reason.NON_CONSTANT}
    assert "graph input" in report.declines[0].decline.message


def test_weight_computed_at_run_time_is_non_constant() -> None:
    # A Neg of an initializer is folded to a constant now (issue 16); a Neg of an input is not.
    g = Graph([1, 4, 8, 8])
    w_in = helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [8, 4, 1, 1])
    w = g.node("Neg", ["w_in"])
    a = g.node("Conv", ["x", w])
    b = g.conv(a, 8, 4, 1)
    model = g.model([b], extra_inputs=[w_in])
    fused, report = fuse_checked(model)
    assert ops(fused)["Conv"] == 2
    assert reasons(report) == {Reason.NON_CONSTANT}
    assert "Neg" in report.declines[0].decline.message


def test_initializer_listed_as_graph_input_is_overridable_so_non_constant() -> None:
    g = Graph([1, 4, 8, 8])
    a = g.conv("x", 4, 8, 1)
    b = g.conv(a, 8, 4, 1)
    w_name = g.nodes[0].input[1]
    w_init = next(t for t in g.inits if t.name == w_name)
    w = helper.make_tensor_value_info(w_name, TensorProto.FLOAT, list(w_init.dims))
    model = g.model([b], extra_inputs=[w])
    fused, report = convfuse_fuse(model)
    assert ops(fused)["Conv"] == 2
    assert reasons(report) == {Reason.NON_CONSTANT}
    assert "overridden" in report.declines[0].decline.message
    assert any("keep_initializers_as_inputs" in n for n in report.notes)


def test_weights_from_constant_nodes() -> None:
    from onnx import numpy_helper

    g = Graph([1, 4, 8, 8])
    w1 = numpy_helper.from_array(g.rng.standard_normal((8, 4, 1, 1)).astype("float32"))
    g.nodes.append(helper.make_node("Constant", [], ["w_const"], value=w1))
    g.nodes.append(helper.make_node("Constant", [], ["b_const"], value_floats=[0.5] * 4))
    a = g.node("Conv", ["x", "w_const"])
    w2 = g.const(g.rng.standard_normal((4, 8, 3, 3)) / 8)
    b = g.node("Conv", [a, w2, "b_const"], pads=[1, 1, 1, 1])
    fused, _ = fuse_checked(g.model([b]))
    assert ops(fused) == {"Conv": 1}  # and the Constant nodes are gone with their readers


@pytest.mark.parametrize("ndim", [1, 3])
def test_1d_and_3d_chains(ndim: int) -> None:
    g = Graph([1, 3] + [7] * ndim)
    y = g.conv("x", 3, 12, [1] * ndim, bias=False)
    y = g.conv(y, 12, 12, [3] * ndim, pads=[1] * 2 * ndim)
    y = g.conv(y, 12, 3, [1] * ndim)
    model = g.model([y])
    fused, _ = fuse_checked(model)
    assert ops(fused)["Conv"] == 1


def test_omitted_attributes_use_defaults() -> None:
    g = Graph([1, 4, 9, 9])
    w1 = g.const(g.rng.standard_normal((8, 4, 1, 1)))
    w2 = g.const(g.rng.standard_normal((4, 8, 3, 3)) / 8)
    a = g.node("Conv", ["x", w1])  # no kernel_shape, strides, dilations, group, pads
    b = g.node("Conv", [a, w2])
    model = g.model([b])
    fused, _ = fuse_checked(model)
    assert ops(fused)["Conv"] == 1


def test_grouped_chain_keeps_groups() -> None:
    g = Graph([1, 8, 8, 8])
    y = g.conv("x", 8, 8, 1, group=4, bias=False)
    y = g.conv(y, 8, 8, 3, group=4, pads=[1, 1, 1, 1])
    model = g.model([y])
    fused, _ = fuse_checked(model)
    conv = fused.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute}["group"] == 4


def convfuse_fuse(model):  # type: ignore[no-untyped-def]
    """``fuse_onnx`` for models ONNX Runtime cannot feed by default (weights as inputs)."""
    import onnx

    import convfuse

    fused, report = convfuse.fuse_onnx(model)
    onnx.checker.check_model(fused, full_check=True)
    return fused, report
