"""Add/Sum of parallel branches of one tensor (RepVGG, ACNet, DBB style) in ONNX graphs."""

from __future__ import annotations

import pytest

from convfuse.decline import Reason
from tests.support.onnx_builders import Graph, fuse_checked, ops, reasons


def _repvgg(opset: int = 17, use_sum: bool = False, c: int = 8) -> Graph:
    g = Graph([1, c, 10, 10])
    a = g.bn(g.conv("x", c, c, 3, pads=[1, 1, 1, 1], bias=False), c)
    b = g.bn(g.conv("x", c, c, 1, bias=False), c)
    i = g.bn("x", c)
    s = g.node("Sum", [a, b, i]) if use_sum else g.node("Add", [g.node("Add", [a, b]), i])
    g.out = g.node("Relu", [s])  # type: ignore[attr-defined]
    return g


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("use_sum", [False, True])
def test_repvgg_block_becomes_one_conv(opset: int, use_sum: bool) -> None:
    g = _repvgg(opset, use_sum)
    fused, report = fuse_checked(g.model([g.out], opset=opset))  # type: ignore[attr-defined]
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert report.merges[-1].kind == "sum"
    assert report.after.params < report.before.params


def test_identity_branch_without_batchnorm() -> None:
    g = Graph([1, 6, 8, 8])
    a = g.conv("x", 6, 6, 3, pads=[1, 1, 1, 1])
    y = g.node("Add", ["x", a])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}


def test_acnet_asymmetric_kernels() -> None:
    g = Graph([1, 4, 9, 9])
    a = g.conv("x", 4, 4, [3, 3], pads=[1, 1, 1, 1])
    b = g.conv("x", 4, 4, [1, 3], pads=[0, 1, 0, 1])
    c = g.conv("x", 4, 4, [3, 1], pads=[1, 0, 1, 0])
    y = g.node("Add", [g.node("Add", [a, b]), c])
    fused, _ = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}


def test_average_pool_branch_counting_padding() -> None:
    g = Graph([1, 4, 9, 9])
    a = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1])
    p = g.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    y = g.node("Add", [a, p])
    fused, _ = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}


def test_average_pool_excluding_padding_declines() -> None:
    """Negative twin: count_include_pad=0 divides border windows by fewer elements."""
    g = Graph([1, 4, 9, 9])
    a = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1])
    p = g.node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = g.node("Add", [a, p])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "AveragePool": 1, "Add": 1}
    assert reasons(report) == {Reason.UNSUPPORTED}


def test_branches_with_different_strides_decline() -> None:
    g = Graph([1, 4, 8, 8])
    a = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1], strides=[2, 2])
    b = g.conv("x", 4, 4, 1, strides=[2, 2])
    c = g.conv("x", 4, 4, 2, strides=[2, 2], pads=[0, 0, 0, 0])
    y = g.node("Add", [g.node("Add", [a, b]), c])
    fused, report = fuse_checked(g.model([y]))
    # 3x3/2 pad 1 and 1x1/2 share a grid and merge; the 2x2/2 one reads another grid and stays.
    assert ops(fused)["Conv"] == 2
    assert reasons(report) == {Reason.GRID_MISMATCH}


def test_stride_mismatch_declines() -> None:
    g = Graph([1, 4, 8, 8])
    a = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1], strides=[2, 2])
    b = g.node("MaxPool", [g.conv("x", 4, 4, 1)], kernel_shape=[1, 1], strides=[2, 2])
    y = g.node("Add", [a, b])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused)["Conv"] == 2  # the 1x1 is behind a MaxPool: a different source, nothing to merge
    assert not report.merges


def test_term_from_another_tensor_stays_in_a_smaller_sum() -> None:
    g = Graph([1, 4, 8, 8])
    r = g.node("Relu", ["x"])
    a = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1])
    b = g.conv("x", 4, 4, 1)
    y = g.node("Sum", [a, r, b])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Relu": 1, "Sum": 1}  # the root keeps its op type
    assert report.merges[-1].kind == "sum"
    assert list(fused.graph.node[-1].input) == [fused.graph.node[1].output[0], r]  # terms keep their order


def test_partial_add_tree_becomes_a_shorter_add_chain() -> None:
    g = Graph([1, 4, 8, 8])
    r = g.node("Relu", ["x"])
    a = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1])
    b = g.conv("x", 4, 4, 1)
    y = g.node("Add", [g.node("Add", [r, a]), b])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Relu": 1, "Add": 1}


def test_shared_branch_output_is_kept() -> None:
    """Negative twin: the 3x3 output also feeds a Relu, so it cannot be merged into the sum."""
    g = Graph([1, 4, 8, 8])
    a = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1])
    b = g.conv("x", 4, 4, 1)
    y = g.node("Add", [a, b])
    r = g.node("Relu", [a])
    fused, report = fuse_checked(g.model([y, r]))
    assert ops(fused)["Conv"] == 2
    assert not report.merges


def test_sum_then_batchnorm_then_conv_chain_after_the_merge() -> None:
    """A merge can enable another: the summed conv then folds the BN that follows it."""
    g = Graph([1, 4, 8, 8])
    a = g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1])
    b = g.conv("x", 4, 4, 1)
    y = g.bn(g.node("Add", [a, b]), 4)
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}
    assert [m.kind for m in report.merges] == ["sum+chain"]


def test_sum_enables_chain_on_its_source() -> None:
    """conv1 feeds two summed convs: once they merge, conv1's output has one reader and chains."""
    g = Graph([1, 4, 8, 8])
    s = g.conv("x", 4, 8, 1, bias=False)
    a = g.conv(s, 8, 4, 3, pads=[1, 1, 1, 1])
    b = g.conv(s, 8, 4, 1)
    y = g.node("Add", [a, b])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}
    assert not report.declines  # the shared-tensor decline of round 1 became moot and is not reported
