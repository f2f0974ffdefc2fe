"""Mul/Add/Sub/Div of a conv's input or output by scalar or per-channel constants."""

from __future__ import annotations

import numpy as np
import pytest

from convfuse.decline import Reason
from tests.support.onnx_builders import Graph, fuse_checked, ops, reasons


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,), (1, 1, 1, 1)])
@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_constant_after_conv_folds(op: str, shape: tuple[int, ...]) -> None:
    g = Graph([1, 3, 7, 7])
    y = g.conv("x", 3, 4, 3, pads=[1, 1, 1, 1])
    c = g.const(g.rng.uniform(0.5, 2.0, shape), "k")
    y = g.node(op, [y, c])
    y = g.node("Relu", [y])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert report.merges[0].kind == f"conv+{op.lower()}"


@pytest.mark.parametrize("op", ["Mul", "Sub"])
def test_constant_first_operand(op: str) -> None:
    g = Graph([1, 3, 7, 7])
    y = g.conv("x", 3, 4, 1)
    y = g.node(op, [g.const(g.rng.uniform(0.5, 2.0, (4, 1, 1)), "k"), y])
    fused, _ = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}


def test_scale_before_padded_conv_is_case_1() -> None:
    """A pure per-channel scale maps zero to zero, so it folds even into a padded conv."""
    g = Graph([1, 3, 7, 7])
    y = g.node("Mul", ["x", g.const(g.rng.uniform(0.5, 2.0, (3, 1, 1)), "k")])
    y = g.conv(y, 3, 4, 3, pads=[1, 1, 1, 1])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1}
    assert "padding case 1" in report.merges[0].note


def test_shift_before_padded_conv_declines() -> None:
    """Negative twin: an added constant is a bias the padded border would not see."""
    g = Graph([1, 3, 7, 7])
    y = g.node("Add", ["x", g.const(g.rng.uniform(0.5, 2.0, (3, 1, 1)), "k")])
    y = g.conv(y, 3, 4, 3, pads=[1, 1, 1, 1])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Add": 1}
    assert reasons(report) == {Reason.PADDED_AFTER_BIASED_POINTWISE}


def test_spatially_varying_constant_declines() -> None:
    g = Graph([1, 3, 7, 7])
    y = g.conv("x", 3, 4, 1)
    y = g.node("Mul", [y, g.const(g.rng.uniform(0.5, 2.0, (1, 4, 7, 7)), "k")])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Mul": 1}
    assert reasons(report) == {Reason.UNSUPPORTED}


def test_division_by_zero_declines() -> None:
    g = Graph([1, 3, 7, 7])
    y = g.conv("x", 3, 4, 1)
    y = g.node("Div", [y, g.const(np.array([1.0, 0.0, 2.0, 1.0]).reshape(4, 1, 1), "k")])
    import convfuse

    fused, report = convfuse.fuse_onnx(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Div": 1}
    assert reasons(report) == {Reason.NON_FINITE}


def test_product_of_two_activations_is_not_linear() -> None:
    g = Graph([1, 3, 7, 7])
    a = g.conv("x", 3, 3, 1)
    y = g.node("Mul", [a, "x"])
    fused, report = fuse_checked(g.model([y]))
    assert ops(fused) == {"Conv": 1, "Mul": 1}
    assert not report.merges and not report.declines
