"""Pad (constant zero) -> Conv: the Pad folds into the conv's explicit pads."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from convfuse.decline import Reason
from tests.support.onnx_builders import Graph, fuse_checked, ops, reasons


def _pads_of(model) -> list[int]:  # type: ignore[no-untyped-def]
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return next(helper.get_attribute_value(a) for a in conv.attribute if a.name == "pads")


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_pad_input_form_folds(opset: int) -> None:
    g = Graph([1, 3, 8, 8])
    pads = g.const(np.array([0, 0, 1, 2, 0, 0, 3, 0]), "pads", np.int64)
    y = g.node("Pad", ["x", pads])
    y = g.conv(y, 3, 4, 3, pads=[0, 1, 0, 1])
    fused, report = fuse_checked(g.model([y], opset=opset))
    assert ops(fused) == {"Conv": 1}
    assert _pads_of(fused) == [1, 3, 3, 1]
    assert "Pad folded" in report.merges[0].note


def test_pad_attribute_form_opset_10() -> None:
    g = Graph([1, 3, 8, 8])
    y = g.node("Pad", ["x"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant", value=0.0)
    y = g.conv(y, 3, 4, 3)
    fused, _ = fuse_checked(g.model([y], opset=10))
    assert ops(fused) == {"Conv": 1}
    assert _pads_of(fused) == [1, 1, 1, 1]


def test_pad_with_axes_opset_18() -> None:
    g = Graph([1, 3, 8, 8])
    pads = g.const(np.array([2, 1]), "pads", np.int64)
    axes = g.const(np.array([-1]), "axes", np.int64)
    y = g.node("Pad", ["x", pads, "", axes])
    y = g.conv(y, 3, 4, 3, strides=[2, 2])
    fused, _ = fuse_checked(g.model([y], opset=18))
    assert ops(fused) == {"Conv": 1}
    assert _pads_of(fused) == [0, 2, 0, 1]


def test_reflect_pad_declines() -> None:
    """Negative twin: ONNX Conv only pads with zeros."""
    g = Graph([1, 3, 8, 8])
    pads = g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]), "pads", np.int64)
    y = g.node("Pad", ["x", pads], mode="reflect")
    y = g.conv(y, 3, 4, 3)
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Pad": 1}
    assert reasons(report) == {Reason.PADDING_MODE}


def test_nonzero_pad_value_declines() -> None:
    g = Graph([1, 3, 8, 8])
    pads = g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]), "pads", np.int64)
    value = g.const(np.array(1.5))
    y = g.node("Pad", ["x", pads, value])
    y = g.conv(y, 3, 4, 3)
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Pad": 1}
    assert reasons(report) == {Reason.UNSUPPORTED}


def test_channel_pad_declines() -> None:
    g = Graph([1, 3, 8, 8])
    pads = g.const(np.array([0, 1, 0, 0, 0, 0, 0, 0]), "pads", np.int64)
    y = g.node("Pad", ["x", pads])
    y = g.conv(y, 4, 4, 1)
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Pad": 1}
    assert reasons(report) == {Reason.UNSUPPORTED}


def test_pad_after_spatial_conv_declines_case_3() -> None:
    g = Graph([1, 3, 8, 8])
    y = g.conv("x", 3, 4, 3)
    pads = g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]), "pads", np.int64)
    y = g.node("Pad", [y, pads])
    fused, report = fuse_checked(g.model([y]), policy="always")
    assert ops(fused) == {"Conv": 1, "Pad": 1}
    assert reasons(report) == {Reason.PADDED_AFTER_SPATIAL}
