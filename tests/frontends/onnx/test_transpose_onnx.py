"""ONNX ConvTranspose attributes <-> ConvTransposeSpec, checked with ONNX Runtime against torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from convfuse.decline import Decline, Reason
from convfuse.frontends.onnx.nodes import NewTensor
from convfuse.frontends.onnx.transpose import transpose_from_attributes, transpose_from_node, transpose_node
from convfuse.transpose import ConvTransposeSpec
from tests.support.helpers import rel_err
from tests.support.transpose_cases import input_for, np_rand, run_transpose, transpose_spec

TOL32 = 1e-5  # float32 runtime against the float64 oracle


def _model(
    node: onnx.NodeProto, inits: Sequence[onnx.TensorProto | NewTensor], x_shape: tuple[int, ...]
) -> onnx.ModelProto:
    protos = [
        t if isinstance(t, onnx.TensorProto) else numpy_helper.from_array(t.array, t.name) for t in inits
    ]
    graph = helper.make_graph(
        [node],
        "one_conv_transpose",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))],
        protos,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


def _fresh(name: str) -> str:
    return name


@settings(max_examples=40)
@given(spec=transpose_spec(), extra=st.tuples(st.integers(0, 2), st.integers(0, 1)))
def test_written_node_runs_in_onnx_runtime_like_torch(
    spec: ConvTransposeSpec, extra: tuple[int, int]
) -> None:
    """Any spec (asymmetric crops, output_padding, groups, dilation, 1D-3D) written as one node."""
    spec32 = spec.astype(np.float32)
    written = transpose_node(spec32, name="ct", x="x", y="y", elem_type=TensorProto.FLOAT, fresh=_fresh)
    needs = [op - e for (_, e), op in zip(spec.pads, spec.output_padding)]
    if any(n >= s for n, s in zip(needs, spec.stride)):  # torch allows it (dilation), ONNX Runtime not
        assert isinstance(written, Decline) and "below the stride" in written.message
        return
    assert not isinstance(written, Decline), written
    node, inits = written
    x = input_for(spec, extra, seed=1)
    got = _ort(_model(node, inits, tuple(x.shape)), x.numpy())
    ref = run_transpose(spec32.astype(np.float64), x)
    assert rel_err(ref, torch.from_numpy(got.astype(np.float64))) <= TOL32
    # ... and reads back to the same spec.
    back = transpose_from_node(node, inits[0].array, None if len(inits) < 2 else inits[1].array)
    assert isinstance(back, ConvTransposeSpec)
    assert (back.stride, back.dilation, back.groups, back.slack) == (
        spec.stride,
        spec.dilation,
        spec.groups,
        spec.slack,
    )
    assert [b for b, _ in back.pads] == [b for b, _ in spec.pads]  # the end is written as pe - op


_FORMS: list[dict[str, Any]] = [
    dict(auto_pad="SAME_UPPER"),
    dict(auto_pad="SAME_LOWER"),
    dict(auto_pad="VALID"),
    dict(auto_pad="SAME_UPPER", output_padding=1),
    dict(auto_pad="SAME_LOWER", output_padding=1),
    dict(pads=(2, 1)),
    dict(pads=(0, 2), output_padding=1),
    dict(output_shape=-1),  # output_shape: full size minus 1 (odd total split), pads ignored
    dict(output_shape=-3, pads=(5, 5)),
    dict(output_shape=-3, auto_pad="SAME_UPPER"),
    dict(output_shape=-3, auto_pad="SAME_LOWER"),
    dict(output_shape=-2, output_padding=1),
]


def _node_attrs(form: dict[str, Any], n: int, k: int, s: int, d: int, size: int) -> dict[str, Any]:
    attrs: dict[str, Any] = dict(strides=[s] * n, dilations=[d] * n, kernel_shape=[k] * n)
    op = form.get("output_padding", 0)
    if op >= max(s, d):
        pytest.skip("output_padding must be below max(stride, dilation)")
    if op:
        attrs["output_padding"] = [op] * n
    if "auto_pad" in form:
        attrs["auto_pad"] = form["auto_pad"]
    if "pads" in form:
        attrs["pads"] = [form["pads"][0]] * n + [form["pads"][1]] * n
    if "output_shape" in form:
        full = (size - 1) * s + d * (k - 1) + 1 + op
        attrs["output_shape"] = [full + form["output_shape"]] * n
    if (
        form.get("auto_pad", "").startswith("SAME")
        and op + d * (k - 1) + 1 < s
        and "output_shape" not in form
    ):
        pytest.skip(
            "SAME with an output larger than the full output: runtimes disagree (declined, tested below)"
        )
    return attrs


@pytest.mark.parametrize("form", _FORMS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("n,k,s,d", [(1, 3, 2, 1), (1, 4, 3, 2), (2, 3, 2, 1), (3, 2, 2, 1), (2, 5, 3, 1)])
def test_every_padding_form_matches_onnx_runtime(
    form: dict[str, Any], n: int, k: int, s: int, d: int
) -> None:
    """A ConvTranspose node as exporters write it -> spec -> torch, equal to ONNX Runtime's output."""
    size = 4
    attrs = _node_attrs(form, n, k, s, d, size)
    groups = 2
    w = np_rand(4, 3, *([k] * n), seed=n + k + s).astype(np.float32)
    b = np_rand(6, seed=d).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], group=groups, **attrs)
    x = np_rand(2, 4, *([size] * n), seed=3)
    model = _model(node, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")], x.shape)
    want = _ort(model, x)
    spec = transpose_from_node(node, w, b, x_spatial=(size,) * n)
    assert isinstance(spec, ConvTransposeSpec), spec
    assert spec.output_size((size,) * n) == want.shape[2:]
    got = run_transpose(spec.astype(np.float64), torch.from_numpy(x))
    assert rel_err(got, torch.from_numpy(want.astype(np.float64))) <= TOL32
    # Written back with explicit pads, the node computes the same in ONNX Runtime.
    written = transpose_node(spec, name="ct", x="x", y="y", elem_type=TensorProto.FLOAT, fresh=_fresh)
    assert not isinstance(written, Decline)
    again = _ort(_model(written[0], written[1], x.shape), x)
    np.testing.assert_allclose(again, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_same_padding_does_not_depend_on_the_input_size() -> None:
    w = np_rand(1, 1, 3, seed=1)
    specs = {
        n: transpose_from_attributes(w, None, dict(strides=[2], auto_pad="SAME_UPPER"), (n,))
        for n in (3, 4, 7)
    }
    assert len({s.pads for s in specs.values()}) == 1
    assert transpose_from_attributes(w, None, dict(strides=[2], auto_pad="SAME_UPPER")).pads == ((0, 1),)
    assert transpose_from_attributes(w, None, dict(strides=[2], auto_pad="SAME_LOWER")).pads == ((1, 0),)


def test_output_shape_needs_a_static_input() -> None:
    w = np_rand(1, 1, 3, seed=1)
    result = transpose_from_attributes(w, None, dict(strides=[2], output_shape=[8]), None)
    assert (
        isinstance(result, Decline) and result.reason is Reason.UNSUPPORTED and "not static" in result.message
    )
    assert isinstance(
        transpose_from_attributes(w, None, dict(strides=[2], output_shape=[8]), (5,)), ConvTransposeSpec
    )
    # Exporters sometimes write the whole shape: the spatial tail is used.
    full = transpose_from_attributes(w, None, dict(strides=[2], output_shape=[1, 1, 8]), (5,))
    assert isinstance(full, ConvTransposeSpec) and full.output_size((5,)) == (8,)


def test_outputs_past_the_full_size_decline() -> None:
    """SAME with stride > extent, or an output_shape past the full output: runtimes disagree."""
    w = np_rand(1, 1, 3, seed=1)
    same = transpose_from_attributes(w, None, dict(strides=[4], auto_pad="SAME_UPPER"))
    assert isinstance(same, Decline) and "larger than its full" in same.message
    big = transpose_from_attributes(w, None, dict(strides=[2], output_shape=[12]), (5,))
    assert isinstance(big, Decline) and big.reason is Reason.UNSUPPORTED


@pytest.mark.parametrize(
    "attrs, match",
    [
        (dict(kernel_shape=[2]), "kernel_shape"),
        (dict(auto_pad="SAME"), "unknown auto_pad"),
        (dict(pads=[1]), "pads"),
        (dict(pads=[-1, 0]), "pads"),
        (dict(strides=[1, 1]), "not 1D"),
        (dict(strides=[0]), "out of range"),
        (dict(group=2), "does not divide"),
    ],
)
def test_unreadable_attributes_decline(attrs: dict[str, Any], match: str) -> None:
    result = transpose_from_attributes(np_rand(3, 1, 3, seed=1), None, attrs)
    assert isinstance(result, Decline) and result.reason is Reason.UNSUPPORTED and match in result.message


def test_writer_declines_what_onnx_runtime_refuses() -> None:
    """ONNX Runtime refuses output_padding >= stride (here dilation 3 would allow it in torch)."""
    spec = ConvTransposeSpec(
        np_rand(1, 1, 3, seed=1).astype(np.float32), stride=(2,), dilation=(3,), output_padding=(2,)
    )
    result = transpose_node(spec, name="ct", x="x", y="y", elem_type=TensorProto.FLOAT, fresh=_fresh)
    assert isinstance(result, Decline) and "below the stride" in result.message
    # Twin: with an end crop of 1 the node needs op = 1 only, is written and runs as torch says.
    ok_spec = spec.replace(pads=((0, 1),))
    ok = transpose_node(ok_spec, name="ct", x="x", y="y", elem_type=TensorProto.FLOAT, fresh=_fresh)
    assert not isinstance(ok, Decline)
    x = np_rand(1, 1, 4, seed=2)
    got = _ort(_model(ok[0], ok[1], (1, 1, 4)), x)
    assert (
        rel_err(
            run_transpose(ok_spec.astype(np.float64), torch.from_numpy(x)),
            torch.from_numpy(got.astype(np.float64)),
        )
        <= TOL32
    )
    huge = spec.replace(output_padding=(0,), weight=np.full((1, 1, 3), 1e39))
    overflow = transpose_node(huge, name="ct", x="x", y="y", elem_type=TensorProto.FLOAT, fresh=_fresh)
    assert isinstance(overflow, Decline) and overflow.reason is Reason.NON_FINITE


def test_onnx_module_imports_no_torch() -> None:
    import ast
    import inspect

    import convfuse.frontends.onnx.transpose as mod
    import convfuse.transpose as math_mod

    for m in (mod, math_mod):
        tree = ast.parse(inspect.getsource(m))
        names = {
            a.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for a in node.names
        }
        names |= {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        }
        assert "torch" not in names, m.__name__
