"""Small ONNX models for front-end tests, and the checks every such test makes.

``check_fused`` is the common oracle: the fused model passes ``onnx.checker`` (full check),
keeps the graph interface, and computes the original's outputs under ONNX Runtime (the ONNX
reference evaluator for float64, which ONNX Runtime's CPU Conv does not support).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import convfuse
from convfuse.decline import Reason
from convfuse.report import Report

__all__ = [
    "IR_FOR_OPSET",
    "Graph",
    "run",
    "ops",
    "reasons",
    "check_fused",
    "fuse_checked",
]

ort.set_default_logger_severity(3)

#: An IR version ONNX Runtime accepts for each opset used in tests.
IR_FOR_OPSET = {7: 3, 9: 4, 10: 5, 11: 6, 13: 7, 14: 7, 15: 8, 17: 8, 18: 8, 19: 9, 21: 10, 22: 10, 23: 11}

_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


class Graph:
    """A tiny graph builder: ``g.conv(x, co, k, **attrs) -> name`` and friends, then ``g.model()``."""

    def __init__(
        self, shape: Sequence[int | str], elem: int = TensorProto.FLOAT, seed: int = 0, x: str = "x"
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.elem = elem
        self.np = _NP[elem]
        self.inputs = [helper.make_tensor_value_info(x, elem, list(shape))]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.ndim = len(shape) - 2

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, array: np.ndarray, prefix: str = "c", dtype: Any = None) -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array).astype(dtype or self.np), name))
        return name

    def node(
        self, op: str, inputs: Sequence[str], name: str | None = None, outputs: int = 1, **attrs: Any
    ) -> str:
        name = name or self.fresh(op.lower())
        outs = [f"{name}_out{k}" if k else f"{name}_out" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0]

    def conv(
        self,
        x: str,
        ci: int,
        co: int,
        k: int | Sequence[int],
        *,
        bias: bool = True,
        group: int = 1,
        name: str | None = None,
        **attrs: Any,
    ) -> str:
        ks = [k] * self.ndim if isinstance(k, int) else list(k)
        w = self.const(
            self.rng.standard_normal((co, ci // group, *ks)) / np.sqrt(ci // group * np.prod(ks)), "w"
        )
        inputs = [x, w]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(co) * 0.5, "b"))
        if group != 1:
            attrs["group"] = group
        return self.node("Conv", inputs, name=name, **attrs)

    def bn(self, x: str, c: int, name: str | None = None, **attrs: Any) -> str:
        r = self.rng
        params = [
            self.const(r.uniform(0.5, 1.5, c), "gamma"),
            self.const(r.uniform(-0.5, 0.5, c), "beta"),
            self.const(r.uniform(-0.5, 0.5, c), "mean"),
            self.const(r.uniform(0.5, 2.0, c), "var"),
        ]
        return self.node("BatchNormalization", [x, *params], name=name, **attrs)

    def model(
        self,
        outputs: Sequence[str],
        opset: int = 17,
        extra_inputs: Sequence[onnx.ValueInfoProto] = (),
    ) -> onnx.ModelProto:
        """A checked model; output types come from shape inference (no intermediate value_info)."""
        outs = [helper.make_tensor_value_info(o, self.elem, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs + list(extra_inputs), outs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_FOR_OPSET[opset]
        )
        inferred = onnx.shape_inference.infer_shapes(model)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        for out in model.graph.output:  # not inferred (training-mode BN...): symbolic dims, input rank
            if not out.type.tensor_type.HasField("shape"):
                rank = self.ndim + 2
                out.CopyFrom(
                    helper.make_tensor_value_info(
                        out.name, self.elem, [f"{out.name}_{i}" for i in range(rank)]
                    )
                )
        onnx.checker.check_model(model, full_check=True)
        return model


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [
            d.dim_value if d.HasField("dim_value") else (2 if k == 0 else 12)
            for k, d in enumerate(tt.shape.dim)
        ]
        feeds[vi.name] = rng.standard_normal(dims).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feeds


def run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None, reference: bool = False
) -> list[np.ndarray]:
    """Outputs of ``model``: ONNX Runtime, or the ONNX reference evaluator (float64 graphs, or
    ``reference=True`` for attribute forms ONNX Runtime does not implement)."""
    feeds = feeds if feeds is not None else _feeds(model)
    if reference or any(f.dtype == np.float64 for f in feeds.values()):
        return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, feeds)]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ops(model: onnx.ModelProto) -> Counter[str]:
    """Op type counts of the main graph."""
    return Counter(n.op_type for n in model.graph.node)


def reasons(report: Report) -> set[Reason]:
    return {d.reason for d in report.declines}


def check_fused(
    original: onnx.ModelProto, fused: onnx.ModelProto, tol: float | None = None, reference: bool = False
) -> float:
    """Checker, interface and numeric equality; returns the relative error. ``reference`` runs the
    original model with the ONNX reference evaluator."""
    onnx.checker.check_model(fused, full_check=True)
    assert [(i.name, i.type) for i in fused.graph.input] == [(i.name, i.type) for i in original.graph.input]
    assert [(o.name, o.type) for o in fused.graph.output] == [(o.name, o.type) for o in original.graph.output]
    assert fused.ir_version == original.ir_version
    assert list(fused.opset_import) == list(original.opset_import)
    used = {n for node in fused.graph.node for n in node.input} | {o.name for o in fused.graph.output}
    dangling = [t.name for t in fused.graph.initializer if t.name not in used]
    assert not dangling, f"dangling initializers {dangling}"
    feeds = _feeds(original)
    if not any(f.dtype == np.float64 for f in feeds.values()):
        # Loads with ONNX Runtime's default options (every graph optimization on).
        ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    expected, actual = run(original, feeds, reference), run(fused, feeds)
    worst = 0.0
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        rel = float(np.max(np.abs(e64 - a64)) / max(np.max(np.abs(e64)), 1e-30))
        worst = max(worst, rel)
    dtype = expected[0].dtype
    limit = tol if tol is not None else {np.float64: 1e-12, np.float16: 5e-3}.get(dtype.type, 1e-5)
    assert worst <= limit, f"relative error {worst:.3g} > {limit:.3g}"
    return worst


def fuse_checked(
    model: onnx.ModelProto, policy: str = "flops", tol: float | None = None, reference: bool = False
) -> tuple[onnx.ModelProto, Report]:
    """Fuse, check (checker, interface, numbers) and confirm the input model was not modified."""
    before = model.SerializeToString()
    fused, report = convfuse.fuse_onnx(model, policy=policy)
    assert model.SerializeToString() == before, "fuse_onnx modified its input"
    check_fused(model, fused, tol, reference)
    return fused, report
