"""BatchNormalization next to a Conv in ONNX graphs (inference form only)."""

from __future__ import annotations

import pytest

from convfuse.border_map import border_merges
from convfuse.decline import Reason
from tests.support.onnx_builders import Graph, fuse_checked, ops, reasons


@pytest.mark.parametrize("opset", [9, 11, 14, 15, 17])
def test_conv_then_batchnorm_folds(opset: int) -> None:
    g = Graph([1, 3, 9, 9])
    y = g.conv("x", 3, 8, 3, pads=[1, 1, 1, 1], bias=False)
    y = g.bn(y, 8, epsilon=1e-3)
    y = g.node("Relu", [y])
    fused, report = fuse_checked(g.model([y], opset=opset))
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert [m.kind for m in report.merges] == ["conv+bn"]
    assert not report.declines


def test_batchnorm_then_unpadded_conv_folds() -> None:
    g = Graph([1, 4, 9, 9])
    y = g.bn("x", 4)
    y = g.conv(y, 4, 8, 3, strides=[2, 2])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}
    assert [m.kind for m in report.merges] == ["bn+conv"]


def test_batchnorm_then_padded_conv_declines_case_2() -> None:
    """Negative twin: BN's shift is a bias the padded conv would see on its border: declined by
    case 1 alone; with the border correction (issue 14) one conv plus the ring."""
    g = Graph([1, 4, 9, 9])
    y = g.bn("x", 4)
    y = g.conv(y, 4, 8, 3, pads=[1, 1, 1, 1])
    with border_merges(False):
        fused, report = fuse_checked(g.model([y]), policy="always")
    assert ops(fused) == {"Conv": 1, "BatchNormalization": 1}
    assert reasons(report) == {Reason.PADDED_AFTER_BIASED_POINTWISE}
    fused, report = fuse_checked(g.model([y]), policy="always")
    assert ops(fused) == {"Conv": 1, "Add": 1} and "padding case 2" in report.merges[0].note


def test_batchnorm_between_convs_folds_with_the_best_neighbour() -> None:
    g = Graph([1, 4, 9, 9])
    y = g.conv("x", 4, 8, 3, pads=[1, 1, 1, 1])
    y = g.bn(y, 8)
    y = g.conv(y, 8, 8, 3, pads=[1, 1, 1, 1])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 2}
    assert Reason.PADDED_AFTER_SPATIAL in reasons(report)


@pytest.mark.parametrize("opset", [14, 15])
def test_training_mode_batchnorm_is_refused(opset: int) -> None:
    g = Graph([2, 3, 6, 6])
    y = g.conv("x", 3, 4, 1)
    y = g.bn(y, 4, training_mode=1, outputs=3)
    model = g.model([y], opset=opset)
    import convfuse

    fused, report = convfuse.fuse_onnx(model)
    assert ops(fused) == {"Conv": 1, "BatchNormalization": 1}
    assert reasons(report) == {Reason.TRAINING_MODE}


def test_batchnorm_alone_is_left_alone() -> None:
    g = Graph([1, 4, 6, 6])
    y = g.node("Relu", ["x"])
    y = g.bn(y, 4)
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Relu": 1, "BatchNormalization": 1}
    assert not report.merges and not report.declines


def test_batchnorm_statistics_from_constant_nodes() -> None:
    g = Graph([1, 3, 6, 6])
    y = g.conv("x", 3, 4, 1)
    import numpy as np
    from onnx import helper, numpy_helper

    names = []
    for k, value in enumerate([np.ones(4), np.zeros(4), np.full(4, 0.25), np.full(4, 2.0)]):
        names.append(f"k{k}")
        g.nodes.append(
            helper.make_node(
                "Constant", [], [f"k{k}"], value=numpy_helper.from_array(value.astype(np.float32))
            )
        )
    y = g.node("BatchNormalization", [y, *names])
    fused, _ = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}  # the Constant nodes went with the BN
