"""The graph index and rewrite state the ONNX rules share: producers, consumers and constants of
one graph (:class:`_Index`), fresh names, the per-model state, node replacements collected in a
round (:class:`_Rewrite`), and helpers on references into subgraphs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import helper, numpy_helper

from ...decline import Decline
from ...policy import Judge
from ...report import Report
from .io import subgraphs
from .nodes import Dims, LinearOp, label, read_linear

#: Ops on small constants that are evaluated to read a constant input (exporters compute
#: ``F.pad``'s pads this way); nodes of these types left unused by a merge are removed.
_FOLDABLE = frozenset(
    {"Constant", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Unsqueeze",
     "Squeeze", "Gather", "Shape", "Mul", "Sub", "Add", "Div", "Range", "Expand"}  # fmt: skip
)


#: Initializers with at most this many elements keep their data for shape inference.
_SMALL_CONSTANT = 1024


Progress = Callable[[str], None]


Shapes = dict[str, tuple[int, Dims | None]]


_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------- graph helpers
def _outer_refs(graph: onnx.GraphProto) -> list[str]:
    """Names ``graph`` (a subgraph) reads from enclosing scopes, in order of first use."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    refs: dict[str, None] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                refs[name] = None
        for sub in subgraphs(node):
            for name in _outer_refs(sub):
                if name not in defined:
                    refs[name] = None
        defined.update(o for o in node.output if o)
    for out in graph.output:
        if out.name not in defined:
            refs[out.name] = None
    return list(refs)


def _uses(node: onnx.NodeProto) -> list[str]:
    """Every name ``node`` reads: its inputs (once per slot) and its subgraphs' outer names."""
    names = [n for n in node.input if n]
    for sub in subgraphs(node):
        names.extend(_outer_refs(sub))
    return names


def _referenced(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> set[str]:
    names = {o.name for o in graph.output}
    for node in nodes:
        names.update(_uses(node))
    return names


def _defined(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in nodes:
        names.update(o for o in node.output if o)
    return names


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a ``Constant`` node as a tensor (``None`` for sparse or string values)."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return helper.make_tensor("", onnx.TensorProto.FLOAT, [], [attr.f])
        if attr.name == "value_floats":
            return helper.make_tensor("", onnx.TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
        if attr.name == "value_int":
            return helper.make_tensor("", onnx.TensorProto.INT64, [], [attr.i])
        if attr.name == "value_ints":
            return helper.make_tensor("", onnx.TensorProto.INT64, [len(attr.ints)], list(attr.ints))
    return None


def _is_default(node: onnx.NodeProto) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    return 1


class _Names:
    """Every name in the model, to hand out fresh ones deterministically."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken: set[str] = set()
        self._add_graph(model.graph)

    def _add_graph(self, graph: onnx.GraphProto) -> None:
        for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
            self.taken.update(v.name for v in coll)
        for node in graph.node:
            self.taken.add(node.name)
            self.taken.update(node.input)
            self.taken.update(node.output)
            for sub in subgraphs(node):
                self._add_graph(sub)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


# --------------------------------------------------------------------------- the index
class _Index:
    """Producers, consumers and constants of one graph's current node list; answers readers."""

    def __init__(
        self,
        nodes: list[onnx.NodeProto],
        graph: onnx.GraphProto,
        outer: dict[str, onnx.TensorProto],
        state: _State,
    ) -> None:
        self.nodes = nodes
        self.opset = state.opset
        self._shapes = state.shapes
        self.inputs = {i.name for i in graph.input}
        self.output_set = {o.name for o in graph.output}
        self.constants: dict[str, onnx.TensorProto] = {k: v for k, v in outer.items() if k not in self.inputs}
        self.overridable: set[str] = set()  # initializers that are also graph inputs
        for init in graph.initializer:
            if init.name not in self.inputs:
                self.constants[init.name] = init
            else:
                self.overridable.add(init.name)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in nodes:
            for name in _uses(node):
                self.consumers.setdefault(name, []).append(node)
            for out in node.output:
                if out:
                    self.producer[out] = node
            if node.op_type == "Constant" and _is_default(node) and node.output:
                value = _constant_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
        self._linear: dict[int, LinearOp | None] = {}

    # Env protocol for readers
    def tensor(self, name: str) -> onnx.TensorProto | str:
        for _ in range(64):  # follow Identity of a constant (exporters emit those)
            found = self.constants.get(name)
            if found is not None:
                return found
            if name in self.overridable:
                return "an initializer listed as a graph input, so it may be overridden at run time"
            if name in self.inputs:
                return "a graph input"
            producer = self.producer.get(name)
            if producer is None:
                return "not a constant of this graph"
            if producer.op_type in _FOLDABLE and _is_default(producer):
                folded = self._fold(producer, name)
                if folded is not None:
                    return folded
            if producer.op_type != "Identity" or not _is_default(producer):
                quantized = (
                    " (quantized: convfuse merges float weights)"
                    if producer.op_type == "DequantizeLinear"
                    else ""
                )
                return f"computed at run time by {producer.op_type} node {label(producer)!r}{quantized}"
            name = producer.input[0]
        return "behind too many Identity nodes"

    def _fold(self, node: onnx.NodeProto, name: str, depth: int = 0) -> onnx.TensorProto | None:
        """The value of a small shape computation on constants (what exporters emit for
        ``F.pad``'s pads), run by ONNX's reference evaluator; None when an input is not constant."""
        if depth > 32 or not node.output or name not in node.output:
            return None
        inputs: list[onnx.TensorProto | None] = []
        for i in node.input:
            if not i:
                inputs.append(None)
                continue
            found = self.constants.get(i)
            if found is None:
                producer = self.producer.get(i)
                if (
                    producer is None
                    or producer.op_type not in _FOLDABLE
                    or i in self.inputs
                    or i in self.overridable
                ):
                    return None
                found = self._fold(producer, i, depth + 1)
            if found is None or math.prod(found.dims) > _SMALL_CONSTANT:
                return None
            inputs.append(found)
        from onnx.reference import ReferenceEvaluator

        names = [f"in{k}" if t is not None else "" for k, t in enumerate(inputs)]
        copy = helper.make_node(node.op_type, names, list(node.output), domain=node.domain)
        copy.attribute.extend(node.attribute)
        outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output]
        known = [
            numpy_helper.from_array(numpy_helper.to_array(t), n)
            for t, n in zip(inputs, names)
            if t is not None
        ]
        graph = helper.make_graph([copy], "fold", [], outputs, known)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        try:
            outs = ReferenceEvaluator(model).run(None, {})
        except Exception:  # noqa: BLE001 - not foldable here: the node stays a run-time value
            return None
        for out, value in zip(node.output, outs):
            self.constants[out] = numpy_helper.from_array(value, out)
        return self.constants.get(name)

    def shape(self, name: str) -> Dims | None:
        entry = self._shapes.get(name)
        dims = None if entry is None else entry[1]
        source = self.shape_source(name)
        if source is not None and (dims is None or None in dims):
            return self.shape(source)  # Reshape(v, Shape(t)): t's shape, symbolic dims included
        return dims

    def shape_source(self, name: str) -> str | None:
        """``t`` when ``name`` is the output of ``Reshape(v, Shape(t))`` (``reshape_as(t)``
        exported with symbolic dims), whose shape is ``t``'s by definition."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Reshape" or len(node.input) < 2 or not _is_default(node):
            return None
        shape = self.producer.get(node.input[1])
        if shape is None or shape.op_type != "Shape" or not _is_default(shape) or shape.attribute:
            return None
        return shape.input[0]

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def linear(self, node: onnx.NodeProto) -> LinearOp | None:
        key = id(node)
        if key not in self._linear:
            self._linear[key] = read_linear(node, self)
        return self._linear[key]

    def is_constant(self, name: str) -> bool:
        return not isinstance(self.tensor(name), str)


# --------------------------------------------------------------------------- state
@dataclass
class _State:
    judge: Judge
    shapes: Shapes
    opset: int
    report: Report
    say: Progress
    names: _Names
    subgraphs: int = 0
    merges: int = 0
    created: set[str] = field(default_factory=set)  # initializers written by merges


@dataclass
class _Rewrite:
    """Node replacements collected by a rule in one round: applied together, at the end."""

    replace: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)  # anchor id -> new nodes
    removed: set[int] = field(default_factory=set)

    def claims(self, nodes: Sequence[onnx.NodeProto]) -> bool:
        return any(id(n) in self.removed for n in nodes)

    def apply(self, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto] | None:
        if not self.removed:
            return None
        out: list[onnx.NodeProto] = []
        for node in nodes:
            if id(node) in self.replace:
                out.extend(self.replace[id(node)])
            elif id(node) not in self.removed:
                out.append(node)
        return out


_Declines = list[tuple[Sequence[str], Decline]]  # node labels and why they were kept
