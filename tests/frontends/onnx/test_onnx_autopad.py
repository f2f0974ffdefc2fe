"""Every Conv ``auto_pad`` form, resolved to explicit pads; written back as NOTSET with pads."""

from __future__ import annotations

import pytest
from onnx import helper

from convfuse.decline import Reason
from tests.support.onnx_builders import Graph, fuse_checked, ops, reasons

AUTO_PADS = ["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]


def _block(auto_pad: str, shape: list, stride: int, kernel: int = 4, dilation: int = 1) -> Graph:
    """1x1 (no bias) -> k x k with ``auto_pad`` -> BN: exact in every form (case 1 when padded)."""
    g = Graph(shape)
    y = g.conv("x", 3, 6, 1, bias=False)
    attrs = {"strides": [stride, stride], "dilations": [dilation, dilation]}
    if auto_pad == "NOTSET":
        attrs["pads"] = [1, 2, 2, 1]
    else:
        attrs["auto_pad"] = auto_pad
    y = g.conv(y, 6, 5, kernel, **attrs)
    g.out = g.bn(y, 5)  # type: ignore[attr-defined]
    return g


@pytest.mark.parametrize("opset", [11, 13, 19])
@pytest.mark.parametrize("auto_pad", AUTO_PADS)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_auto_pad_form_merges(auto_pad: str, stride: int, opset: int) -> None:
    g = _block(auto_pad, [1, 3, 11, 10], stride)
    fused, report = fuse_checked(g.model([g.out], opset=opset))  # type: ignore[attr-defined]
    assert ops(fused) == {"Conv": 1}
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    assert "auto_pad" not in attrs and len(attrs["pads"]) == 4


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_with_dilation_and_odd_total(auto_pad: str) -> None:
    """ONNX Runtime refuses dilated SAME convs; the reference evaluator runs the original."""
    g = _block(auto_pad, [1, 3, 9, 9], 1, kernel=2, dilation=3)
    fused, _ = fuse_checked(g.model([g.out]), reference=True)  # type: ignore[attr-defined]
    assert ops(fused) == {"Conv": 1}


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_with_stride_and_dynamic_size_declines(auto_pad: str) -> None:
    """Negative twin: SAME at stride 2 pads by the input size, which is not static here."""
    g = _block(auto_pad, [1, 3, "H", "W"], 2)
    fused, report = fuse_checked(g.model([g.out]))  # type: ignore[attr-defined]
    assert ops(fused) == {"Conv": 2, "BatchNormalization": 1}
    assert reasons(report) == {Reason.UNSUPPORTED}
    assert "not static" in report.declines[0].decline.message


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_stride_one_same_does_not_need_static_size(auto_pad: str) -> None:
    g = _block(auto_pad, ["N", 3, "H", "W"], 1)
    fused, _ = fuse_checked(g.model([g.out]))  # type: ignore[attr-defined]
    assert ops(fused) == {"Conv": 1}


def test_untouched_nodes_keep_their_auto_pad() -> None:
    g = Graph([1, 3, 8, 8])
    y = g.conv("x", 3, 4, 3, auto_pad="SAME_UPPER")
    y = g.node("Relu", [y])
    model = g.model([y])
    fused, _ = fuse_checked(model)
    assert fused.graph.node[0] == model.graph.node[0]
