"""Fold what does not depend on the input: constant subgraphs and static shape arithmetic.

Pattern: a node every input of which is a constant (a non-overridable initializer, a ``Constant``
node, or the output of a node folded before it) computes the same value on every run; so does
``Shape``/``Size`` of a tensor whose dims are all static. Such nodes are evaluated once, with ONNX
Runtime on the extracted subgraph (the ONNX reference evaluator where ONNX Runtime cannot run it),
and the tensors the rest of the graph reads from them become initializers *named after the tensor
they replace*; the folded nodes and what they alone fed are removed. Rounds repeat with fresh shape
inference until nothing changes (a folded ``Pad`` width makes the padded tensor's shape static,
which makes its ``Shape`` foldable...). With symbolic input dims only what does not read them folds.

Conditions (otherwise the node stays, with a typed decline when it would have folded):
- never ``QuantizeLinear``/``DequantizeLinear`` (the runtime's quantization contract), ops of
  other domains, or nondeterministic ops (``RandomNormal*``, ``RandomUniform*``, ``Multinomial``,
  ``Bernoulli``, a ``Dropout`` given a ``training_mode``);
- an ``If``/``Loop``/``Scan`` only when every name its bodies read from outside is constant;
- never an output of more than :data:`MAX_FOLDED_ELEMENTS` elements that is larger than the
  node's inputs together (``ConstantOfShape``/``Expand``/``Tile``... would bloat the file), nor a
  size-increasing op whose output size inference cannot tell before evaluating.

Only the main graph is folded (bodies of control flow are left as they are). Exact by
construction: the runtime computes the folded values with the model's own kernels and dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ...decline import Decline, Reason
from ...errors import one_line
from .io import subgraphs

__all__ = [
    "MAX_FOLDED_ELEMENTS",
    "Folded",
    "FoldResult",
    "fold_constants",
    "graph_reads",
    "prune",
    "static_shapes",
]

#: Largest folded tensor (elements) allowed when it is larger than the node's inputs.
MAX_FOLDED_ELEMENTS = 2**24
#: Safety stop for the fold rounds.
_MAX_ROUNDS = 32
#: Initializers up to this many elements keep their data for shape inference (integers: shapes).
_SMALL = 1024
_SMALL_INT = 2**16

_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
_QUANTIZATION = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
#: Ops whose output can be much larger than their inputs: their size must be known before folding.
_EXPANDING = {
    "ConstantOfShape",
    "Expand",
    "Tile",
    "Range",
    "Resize",
    "Upsample",
    "Pad",
    "MatMul",
    "Gemm",
    "Einsum",
    "OneHot",
    "EyeLike",
    "CumSum",
    "Loop",
    "Scan",
    "If",
    "ConvTranspose",
}
_DEFAULT = ("", "ai.onnx")

Shapes = dict[str, tuple[int, tuple[int | None, ...] | None]]


@dataclass(frozen=True)
class Folded:
    """One folded subgraph (a connected group of nodes) and the initializers that replace it."""

    nodes: tuple[str, ...]
    tensors: tuple[str, ...]
    elements: int


@dataclass
class FoldResult:
    folded: list[Folded] = field(default_factory=list)
    declines: list[tuple[list[str], Decline]] = field(default_factory=list)
    removed_dead: int = 0
    rounds: int = 0

    @property
    def node_count(self) -> int:
        return sum(len(f.nodes) for f in self.folded) + self.removed_dead


# --------------------------------------------------------------------------- graph reading
def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a body reads from enclosing scopes."""
    bound = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    free: set[str] = set()
    for node in graph.node:
        free.update(n for n in node.input if n and n not in bound)
        for body in subgraphs(node):
            free.update(_free_names(body) - bound)
        bound.update(node.output)
    free.update(o.name for o in graph.output if o.name not in bound)
    return free


def graph_reads(node: onnx.NodeProto) -> list[str]:
    """Every name ``node`` reads: its inputs and the outer names its bodies read."""
    names = [n for n in node.input if n]
    for body in subgraphs(node):
        names.extend(sorted(_free_names(body)))
    return names


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def static_shapes(model: onnx.ModelProto) -> Shapes:
    """Element type and dims (``None`` where symbolic) of every tensor shape inference tells,
    with data propagation, on a skeleton whose large float initializers are declared inputs."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g, src = skeleton.graph, model.graph
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    declared = {i.name for i in g.input}
    for init in src.initializer:
        size = math.prod(init.dims)
        integer = init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        if size <= _SMALL or (integer and size <= _SMALL_INT):
            g.initializer.append(init)
        elif init.name not in declared:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(
            skeleton, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception:  # best effort: fall back to the model's own annotations
        inferred = skeleton
        inferred.graph.value_info.extend(src.value_info)
    shapes: Shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            dims = None
            if tt.HasField("shape"):
                dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
            shapes[vi.name] = (int(tt.elem_type), dims)
    for init in src.initializer:
        shapes[init.name] = (int(init.data_type), tuple(int(d) for d in init.dims))
    return shapes


def _numel(shapes: Shapes, name: str) -> int | None:
    entry = shapes.get(name)
    if entry is None or entry[1] is None or any(d is None for d in entry[1]):
        return None
    return math.prod(entry[1])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- one round
def _refusal(node: onnx.NodeProto, opset: int) -> Decline | None:
    """Why ``node`` must never fold, whatever its inputs."""
    if node.domain not in _DEFAULT:
        return Decline(
            Reason.UNSUPPORTED,
            f"{_label(node)}: op {node.domain}:{node.op_type} of another domain is not folded",
        )
    if node.op_type in _QUANTIZATION:
        return Decline(
            Reason.QUANTIZED,
            f"{_label(node)}: a {node.op_type} of a constant is the runtime's quantization contract",
        )
    if node.op_type in _NONDETERMINISTIC or (
        node.op_type == "Dropout" and len(node.input) >= 3 and node.input[2]
    ):
        return Decline(
            Reason.NONDETERMINISTIC, f"{_label(node)}: {node.op_type} is not the same on every run"
        )
    return None


def _shape_value(node: onnx.NodeProto, shapes: Shapes) -> np.ndarray | None:
    """The value of ``Shape``/``Size`` of a tensor with static dims, else ``None``."""
    if node.op_type not in ("Shape", "Size") or node.domain not in _DEFAULT or not node.input:
        return None
    entry = shapes.get(node.input[0])
    if entry is None or entry[1] is None or any(d is None for d in entry[1]):
        return None
    dims = list(entry[1])
    if node.op_type == "Size":
        return np.array(math.prod(dims), dtype=np.int64)  # type: ignore[arg-type]
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return np.array(dims[slice(start, end)], dtype=np.int64)


def _evaluate(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    outputs: list[str],
    shapes: Shapes,
) -> dict[str, np.ndarray] | str:
    """Values of ``outputs`` computed by ``nodes`` from ``inits``: ONNX Runtime, else the reference
    evaluator."""
    graph = helper.make_graph(
        nodes,
        "fold",
        [],
        [helper.make_tensor_value_info(o, shapes.get(o, (0, None))[0], None) for o in outputs],
        inits,
    )
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    problems = []
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return dict(zip(outputs, session.run(outputs, {})))
    except Exception as exc:
        problems.append(f"ONNX Runtime: {one_line(exc, 160)}")
    try:
        from onnx.reference import ReferenceEvaluator

        return dict(zip(outputs, (np.asarray(v) for v in ReferenceEvaluator(sub).run(outputs, {}))))
    except Exception as exc:
        problems.append(f"reference evaluator: {one_line(exc, 160)}")
    return "; ".join(problems)


def _groups(nodes: list[onnx.NodeProto]) -> list[list[onnx.NodeProto]]:
    """Connected components of ``nodes`` (joined by the tensors they share), in graph order."""
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in [*graph_reads(node), *node.output]:
            if name in owner:
                parent[find(i)] = find(owner[name])
            else:
                owner[name] = i
    comps: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(nodes):
        comps.setdefault(find(i), []).append(node)
    return list(comps.values())


def _round(model: onnx.ModelProto, result: FoldResult, final: bool) -> bool:
    """Fold every foldable node once; ``final`` records declines. Returns whether anything changed."""
    graph = model.graph
    shapes = static_shapes(model)
    inputs = {i.name for i in graph.input}
    constant = {t.name for t in graph.initializer if t.name not in inputs}
    opset = next((int(e.version) for e in model.opset_import if e.domain in _DEFAULT), 1)
    nodes = list(graph.node)  # held, so that id() of each node stays unique this round
    closure: list[onnx.NodeProto] = []
    shape_values: dict[str, np.ndarray] = {}
    for node in nodes:
        value = _shape_value(node, shapes)
        if value is not None and node.output and node.output[0]:
            shape_values[node.output[0]] = value
            constant.add(node.output[0])
            continue
        reads = graph_reads(node)
        if not all(n in constant for n in reads):
            continue
        refusal = _refusal(node, opset)
        if refusal is None:
            refusal = _too_large(node, shapes)
        if refusal is not None:
            if final and node.op_type != "Constant":
                result.declines.append(([_label(node)], refusal))
            continue
        closure.append(node)
        constant.update(o for o in node.output if o)
    # What the rest of the graph reads from the closure.
    inside = {id(n) for n in closure}
    read_outside: set[str] = {o.name for o in graph.output}
    for node in nodes:
        if id(node) not in inside:
            read_outside.update(graph_reads(node))
    # A Constant whose value is read outside stays (it is already a constant); the rest is evaluated.
    work = [n for n in closure if not (n.op_type == "Constant" and any(o in read_outside for o in n.output))]
    if not any(n.op_type != "Constant" for n in work) and not shape_values:
        return False
    work_outputs = {o for n in work for o in n.output if o}
    needed = sorted(o for o in work_outputs if o in read_outside)
    feeds = {n for node in work for n in graph_reads(node)} - work_outputs
    inits = [t for t in graph.initializer if t.name in feeds and t.name not in shape_values]
    extra = [numpy_helper.from_array(v, k) for k, v in shape_values.items() if k in feeds]
    values: dict[str, np.ndarray] = {}
    if needed:
        kept_constants = [
            n for n in closure if n.op_type == "Constant" and id(n) not in {id(w) for w in work}
        ]
        evaluated = _evaluate(model, [*kept_constants, *work], inits + extra, needed, shapes)
        if isinstance(evaluated, str):
            if final:
                result.declines.append(
                    (
                        [_label(n) for n in work],
                        Decline(Reason.UNSUPPORTED, f"could not evaluate: {evaluated}"),
                    )
                )
            work, needed = [], []
        else:
            values.update(evaluated)
    removed = {id(n) for n in work} | {
        id(n) for n in nodes if n.op_type in ("Shape", "Size") and n.output and n.output[0] in shape_values
    }
    if not removed:
        return False
    still_read = {o.name for o in graph.output} | {
        r for n in nodes if id(n) not in removed for r in graph_reads(n)
    }
    values.update({k: v for k, v in shape_values.items() if k in still_read})
    folded_nodes = [n for n in nodes if id(n) in removed]
    for group in _groups(folded_nodes):
        outs = tuple(o for n in group for o in n.output if o in values)
        result.folded.append(
            Folded(tuple(_label(n) for n in group), outs, sum(int(values[o].size) for o in outs))
        )
    keep = [n for n in nodes if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    existing = {t.name for t in graph.initializer}
    for name in sorted(values):
        if name not in existing:
            graph.initializer.append(numpy_helper.from_array(np.asarray(values[name]), name))
    _drop_value_info(graph, set(values))
    return True


def _too_large(node: onnx.NodeProto, shapes: Shapes) -> Decline | None:
    inputs = sum(_numel(shapes, n) or 0 for n in node.input if n)
    for out in node.output:
        if not out:
            continue
        size = _numel(shapes, out)
        if size is None and node.op_type in _EXPANDING:
            return Decline(
                Reason.TOO_LARGE, f"{_label(node)}: the size of {out!r} is not known before evaluating it"
            )
        if size is not None and size > MAX_FOLDED_ELEMENTS and size > inputs:
            return Decline(
                Reason.TOO_LARGE,
                f"{_label(node)}: folding {out!r} would store {size:,} elements (> {MAX_FOLDED_ELEMENTS:,}) "
                f"from {inputs:,} input elements",
            )
    return None


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    for k in reversed(range(len(graph.value_info))):
        if graph.value_info[k].name in names:
            del graph.value_info[k]


def prune(graph: onnx.GraphProto, live_before: set[str]) -> int:
    """Drop nodes and initializers folding left unread (what the input left dangling stays)."""
    removed = 0
    while True:
        read = {o.name for o in graph.output} | {n for node in graph.node for n in graph_reads(node)}
        nodes = list(graph.node)
        dead = [
            n
            for n in nodes
            if not any(o in read for o in n.output if o)
            and any(o in live_before for o in n.output)
            and n.op_type not in _NONDETERMINISTIC
        ]
        if not dead:
            break
        ids = {id(n) for n in dead}
        keep = [n for n in nodes if id(n) not in ids]
        del graph.node[:]
        graph.node.extend(keep)
        removed += len(dead)
    read = {o.name for o in graph.output} | {n for node in graph.node for n in graph_reads(node)}
    inputs = {i.name for i in graph.input}
    gone = set()
    for k in reversed(range(len(graph.initializer))):
        name = graph.initializer[k].name
        if name not in read and name not in inputs and name in live_before:
            gone.add(name)
            del graph.initializer[k]
    defined = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | inputs
    _drop_value_info(graph, {v.name for v in graph.value_info if v.name not in defined})
    return removed


def fold_constants(model: onnx.ModelProto) -> FoldResult:
    """Fold ``model``'s main graph in place (see the module docstring); what was folded and declined."""
    graph = model.graph
    live_before = {o.name for o in graph.output} | {n for node in graph.node for n in graph_reads(node)}
    result = FoldResult()
    for round_no in range(1, _MAX_ROUNDS + 1):
        result.rounds = round_no
        if not _round(model, result, final=False):
            break
    _round(model, result, final=True)  # nothing left to fold: records why the rest stays
    result.removed_dead = prune(graph, live_before)
    return result


def describe(result: FoldResult) -> Sequence[str]:
    """One line per folded subgraph (for the verbose report)."""
    return [f"{len(f.nodes)} node(s) -> {', '.join(f.tensors) or 'nothing read'}" for f in result.folded]
