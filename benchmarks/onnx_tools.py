"""ONNX plumbing for the benchmarks: train-form export, graph counts, MACs, peer tools, ORT sessions.

Nothing here knows about convfuse; the convfuse side goes through :mod:`benchmarks.adapters`.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

__all__ = [
    "COUNTED_OPS",
    "OPSET",
    "OrtLevel",
    "count_all",
    "count_ops",
    "export_train_form",
    "macs",
    "onnxoptimizer_passes",
    "ort_optimized_graph",
    "ort_session",
    "peer_available",
    "run_onnxoptimizer",
    "run_onnxsim",
    "run_session",
]

OPSET = 17

#: The op families counted in the tables; ORT's fused/NCHWc kernels are counted with their family.
COUNTED_OPS = ("Conv", "BatchNormalization", "Add")
_FAMILY = {
    "Conv": "Conv",
    "FusedConv": "Conv",
    "BatchNormalization": "BatchNormalization",
    "Add": "Add",
    "Sum": "Add",
}

OrtLevel = str  # "disabled" or "all"
_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ExportError(RuntimeError):
    """The exported graph is not the train-form graph the benchmark needs."""


# --------------------------------------------------------------------------- export
def export_train_form(
    module: nn.Module, input_shape: Sequence[int], path: str | os.PathLike[str]
) -> onnx.ModelProto:
    """Export ``module`` (eval mode) without constant folding, so every BatchNorm stays a node.

    Uses the TorchScript exporter (``dynamo=False``; the dynamo exporter needs onnxscript) at
    opset :data:`OPSET`, batch 1 and static shapes. Raises :class:`ExportError` when the graph has
    fewer BatchNormalization nodes than the module has BatchNorm layers (folded by the exporter).
    """
    if module.training:
        raise ExportError("export the module in eval mode (BN running statistics), not training mode")
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
        )
    model = onnx.load(str(path))
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    found = count_ops(model)["BatchNormalization"]
    if found < n_bn:
        raise ExportError(
            f"{path}: {found} BatchNormalization nodes for {n_bn} BatchNorm layers (folded at export)"
        )
    return model


# --------------------------------------------------------------------------- graph measures
def _data_path(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that depend on a graph input (not on initializers or constants alone)."""
    g = model.graph
    consts = {t.name for t in g.initializer}
    live = {i.name for i in g.input if i.name not in consts}
    nodes = []
    for node in g.node:  # ONNX graphs are topologically sorted
        if any(i in live for i in node.input if i):
            live.update(node.output)
            nodes.append(node)
    return nodes


def count_ops(model: onnx.ModelProto) -> Counter[str]:
    """Data-path nodes per op family of :data:`COUNTED_OPS`, plus ``"nodes"``: all data-path nodes.

    Any domain; FusedConv counts as Conv, Sum as Add. Nodes that only compute on constants (the
    weight arithmetic onnxoptimizer's ``fuse_bn_into_conv`` leaves for a constant folder) are not
    counted here; :func:`count_all` counts them.
    """
    counts: Counter[str] = Counter({op: 0 for op in COUNTED_OPS})
    nodes = _data_path(model)
    for node in nodes:
        family = _FAMILY.get(node.op_type)
        if family is not None:
            counts[family] += 1
    counts["nodes"] = len(nodes)
    return counts


def count_all(model: onnx.ModelProto) -> int:
    """Every node of the main graph, constant arithmetic included."""
    return len(model.graph.node)


def _dims(vi: onnx.ValueInfoProto) -> list[int] | None:
    shape = vi.type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return None if any(d is None for d in dims) else dims  # type: ignore[return-value]


def macs(model: onnx.ModelProto) -> int | None:
    """Multiply-accumulates of Conv, Gemm and MatMul nodes (standard domain), from inferred shapes.

    Conv: ``prod(output shape) * Ci/g * prod(kernel)``; Gemm/MatMul: ``prod(output) * K``.
    ``None`` when a needed shape is unknown (or the graph uses non-standard ops).
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes: dict[str, list[int] | None] = {vi.name: _dims(vi) for vi in [*g.input, *g.value_info, *g.output]}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    total = 0
    for node in g.node:
        if node.domain not in ("", "ai.onnx") and node.op_type in ("Conv", "FusedConv"):
            return None
        if node.op_type == "Conv":
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w is None or out is None:
                return None
            total += math.prod(out) * math.prod(w[1:])
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a is None or out is None:
                return None
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if trans_a else a[-1]
            total += math.prod(out) * k
    return total


# --------------------------------------------------------------------------- peer tools
def peer_available(name: str) -> bool:
    """Whether the peer tool ``onnxsim`` or ``onnxoptimizer`` can be imported."""
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def run_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-simplifier with its defaults (constant folding, its optimizer passes incl. BN fusion)."""
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim reported that its simplified model failed its own check")
    return simplified


def onnxoptimizer_passes() -> list[str]:
    """onnxoptimizer's own list of fuse and elimination passes (fuse_bn_into_conv, ...)."""
    import onnxoptimizer

    return list(onnxoptimizer.get_fuse_and_elimination_passes())


def run_onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxoptimizer with :func:`onnxoptimizer_passes`."""
    import onnxoptimizer

    return onnxoptimizer.optimize(model, onnxoptimizer_passes())


# --------------------------------------------------------------------------- ONNX Runtime
def _options(level: OrtLevel, threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Sessions are timed round-robin; spinning workers of one would steal the cores of the next.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def ort_session(model: onnx.ModelProto | bytes, level: OrtLevel, threads: int) -> ort.InferenceSession:
    """A CPU session with graph optimizations ``level`` ("disabled" or "all") and ``threads``
    intra-op threads."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, _options(level, threads), providers=["CPUExecutionProvider"])


def ort_optimized_graph(model: onnx.ModelProto, level: OrtLevel = "all") -> onnx.ModelProto:
    """The graph ORT actually runs after its optimizations (may hold contrib/NCHWc ops)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = _options(level, 1)
        opts.optimized_model_filepath = str(Path(tmp) / "ort_optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def run_session(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """The first output of ``session`` on input ``x``."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: x})[0]
