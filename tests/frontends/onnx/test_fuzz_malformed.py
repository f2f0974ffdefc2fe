"""Random graphs damaged in random ways: convfuse either fuses them or raises a ConvfuseError,
never anything else, and what it returns still passes the checker whenever the input did."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import convfuse
from convfuse.errors import ConvfuseError
from tests.support.onnx_graphs import random_model

_OPS = [
    "Conv",
    "BatchNormalization",
    "Add",
    "Mul",
    "Sub",
    "Div",
    "Pad",
    "AveragePool",
    "Relu",
    "Identity",
    "Sum",
]
_INTS = [-3, -1, 0, 1, 2, 3, 7, 2**31 - 1]


def _mutate(draw: st.DrawFn, model: onnx.ModelProto) -> None:
    """One damaging edit of ``model`` in place."""
    graph = model.graph
    kind = draw(st.sampled_from(["attribute", "input", "dims", "op", "dtype", "shape", "drop-attribute"]))
    if not graph.node:
        return
    node = draw(st.sampled_from(list(graph.node)))
    if kind == "attribute":
        ints = [a for a in node.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
        if not ints:
            node.attribute.append(
                helper.make_attribute(draw(st.sampled_from(["group", "pads", "strides"])), [1])
            )
            return
        attr = draw(st.sampled_from(ints))
        if attr.type == onnx.AttributeProto.INT:
            attr.i = draw(st.sampled_from(_INTS))
        elif attr.ints:
            k = draw(st.integers(0, len(attr.ints) - 1))
            attr.ints[k] = draw(st.sampled_from(_INTS))
    elif kind == "drop-attribute" and node.attribute:
        del node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
    elif kind == "input":
        names = (
            [i.name for i in graph.input]
            + [t.name for t in graph.initializer]
            + [o for n in graph.node for o in n.output]
        )
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace" and node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
        elif action == "drop" and node.input:
            del node.input[-1]
        else:
            node.input.append(draw(st.sampled_from(names)))
    elif kind == "dims" and graph.initializer:
        tensor = draw(st.sampled_from(list(graph.initializer)))
        array = numpy_helper.to_array(tensor)
        shape = draw(
            st.sampled_from([(array.size,), (1, array.size), array.shape[::-1], (array.size, 1, 1, 1)])
        )
        tensor.CopyFrom(numpy_helper.from_array(array.reshape(shape), tensor.name))
    elif kind == "op":
        node.op_type = draw(st.sampled_from(_OPS))
    elif kind == "dtype" and graph.initializer:
        tensor = draw(st.sampled_from(list(graph.initializer)))
        to = draw(st.sampled_from([np.float64, np.int64, np.int8, np.float16]))
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(to), tensor.name))
    elif kind == "shape":
        dims = graph.input[0].type.tensor_type.shape.dim
        dim = dims[draw(st.integers(0, len(dims) - 1))]
        if draw(st.booleans()):
            dim.dim_param = "N"
        else:
            dim.dim_value = draw(st.sampled_from([0, 1, 2, 1000]))


@st.composite
def damaged_model(draw: st.DrawFn) -> onnx.ModelProto:
    model = draw(random_model(max_ops=6))
    for _ in range(draw(st.integers(1, 3))):
        _mutate(draw, model)
    return model


def _checker_accepts(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model)
    except Exception:  # noqa: BLE001 - any checker failure
        return False
    return True


@settings(max_examples=300)
@given(model=damaged_model())
def test_damaged_graphs_fuse_or_raise_a_convfuse_error(model: onnx.ModelProto) -> None:
    before = model.SerializeToString()
    try:
        fused, _ = convfuse.fuse_onnx(model)
    except ConvfuseError as exc:
        assert "\n" not in str(exc)
        return
    finally:
        assert model.SerializeToString() == before
    if _checker_accepts(model):
        onnx.checker.check_model(fused)


@pytest.mark.slow
@settings(max_examples=5000)
@given(model=damaged_model())
def test_damaged_graphs_fuse_or_raise_a_convfuse_error_long(model: onnx.ModelProto) -> None:
    test_damaged_graphs_fuse_or_raise_a_convfuse_error.hypothesis.inner_test(model)  # type: ignore[attr-defined]
