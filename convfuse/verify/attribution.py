"""Who is at fault in a mismatch: the regions of the candidate that are wrong on their own.

Every tensor both graphs share by name becomes an extra output of both models and is compared;
each diverging region then runs alone on the reference's values at its boundary, so an error it
makes there is its own and one it loses there was inherited from upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from .. import runtime as rt
from ..errors import ConvfuseError
from .input_plan import InputPlan
from .inputs import ONNX_DTYPES, OnnxSource, Port, check_same_names, generate_inputs, load_for_run, signature
from .result import OutputCheck, Suspect, judge

__all__ = ["TensorTypes", "attribute", "tensor_types"]

#: Element type (``onnx.TensorProto`` enum) of each tensor name.
TensorTypes = dict[str, int]


def attribute(
    reference: OnnxSource,
    candidate: OnnxSource,
    *,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    device: str = "cpu",
    samples: int = 1,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    aliases: Mapping[str, str] | None = None,
    notes: list[str] | None = None,
) -> tuple[Suspect, ...]:
    """Name the regions where ``candidate`` first diverges from ``reference`` (empty if nowhere).

    Every tensor a candidate node produces that the reference also has (same name, or mapped by
    ``aliases``: candidate name -> reference name) becomes an extra output of both models and is
    compared. A diverging shared tensor is a *first* divergence when the candidate nodes that
    compute it from the nearest shared tensors read no diverging shared tensor; those nodes
    (typically one merged Conv) and the reference nodes between the same boundaries form the
    :class:`Suspect`. Front ends need only keep the names of the tensors at region boundaries.
    Samples run one at a time (``feeds``, or ``samples`` generated ones) until one diverges.
    """
    ref_model, ref_path = load_for_run(reference, "reference")
    cand_model, cand_path = load_for_run(candidate, "candidate")
    notes = [] if notes is None else notes
    ref_in, _ = signature(ref_model)
    cand_in, _ = signature(cand_model)
    check_same_names("input", ref_in, cand_in)
    if feeds is None:
        feeds = generate_inputs(InputPlan(ref_model, ref_in, cand_in, shapes).first(), samples, seed)
    ref_graph, cand_graph = ref_model.graph, cand_model.graph
    ref_producers, cand_producers = _producers(ref_graph), _producers(cand_graph)

    # Shared tensors, in candidate topological order: candidate name -> reference name.
    aliases = dict(aliases or {})
    shared = {
        out: aliases.get(out, out)
        for node in cand_graph.node
        for out in node.output
        if out and aliases.get(out, out) in ref_producers
    }
    ref_types, cand_types = tensor_types(ref_model), tensor_types(cand_model)
    untyped = [
        c
        for c, r in shared.items()
        if cand_types.get(c) not in ONNX_DTYPES or ref_types.get(r) not in ONNX_DTYPES
    ]
    if untyped:
        notes.append(f"attribution skipped {len(untyped)} shared tensor(s) without a numeric type to compare")
    shared = {c: r for c, r in shared.items() if c not in untyped}

    ref_probe = _with_outputs(ref_model, {r: ref_types[r] for r in shared.values()})
    cand_probe = _with_outputs(cand_model, {c: cand_types[c] for c in shared})
    ref_sess = rt.session(ref_probe, device, "reference")
    cand_sess = rt.session(cand_probe, device, "candidate")
    bf16 = frozenset(p.name for p in ref_in if p.dtype == "bfloat16")
    checks: dict[str, OutputCheck] = {}
    for sample, feed in enumerate(feeds):  # noqa: B007 (the last sample is reported)
        ref_run = rt.run(ref_sess, feed, list(dict.fromkeys(shared.values())), "reference", bfloat16=bf16)
        cand_run = rt.run(cand_sess, feed, list(shared), "candidate", bfloat16=bf16)
        checks = {
            c: judge(
                c,
                device,
                _dtype(ref_types[r]),
                _dtype(cand_types[c]),
                [ref_run[r]],
                [cand_run[c]],
                rtol,
                atol,
            )
            for c, r in shared.items()
        }
        if not all(check.passed for check in checks.values()):
            break

    # Each diverging region runs alone on the reference's values at its boundary: an error it
    # makes there is its own; one it loses there was inherited from upstream.
    ref_boundary = set(shared.values())
    ref_values = {c: ref_run[r] for c, r in shared.items()}
    suspects = []
    for name, check in checks.items():
        if check.passed:
            continue
        cand_nodes, reached = _region(cand_graph, cand_producers, name, lambda t: t in checks)
        alone: OutputCheck | None
        try:
            alone = _region_alone(
                cand_model,
                cand_nodes,
                name,
                cand_types,
                {**feed, **ref_values},
                ref_run[shared[name]],
                device,
                rtol,
                atol,
            )
        except ConvfuseError as e:  # e.g. a node with a subgraph reading outer tensors
            notes.append(f"could not run the region of '{name}' alone ({e}); judged it from the full run")
            alone = None if any(not checks[t].passed for t in reached) else check
        if alone is None or alone.passed:
            continue
        ref_nodes, _ = _region(ref_graph, ref_producers, shared[name], lambda t: t in ref_boundary)
        suspects.append(
            Suspect(
                check=alone,
                candidate_nodes=tuple(_node_label(cand_graph.node[i], i) for i in cand_nodes),
                reference_nodes=tuple(_node_label(ref_graph.node[i], i) for i in ref_nodes),
                sample=sample,
            )
        )
    if checks and not suspects and not all(c.passed for c in checks.values()):
        notes.append(
            "no region is wrong on its own: the error builds up across regions that are each within tolerance"
        )
    return tuple(suspects)


def _region_alone(
    model: onnx.ModelProto,
    nodes: Sequence[int],
    output: str,
    types: Mapping[str, int],
    values: Mapping[str, np.ndarray],
    expected: np.ndarray,
    device: str,
    rtol: float | None,
    atol: float | None,
) -> OutputCheck:
    """Run ``nodes`` of ``model`` alone, fed ``values`` at their inputs, and judge ``output``."""
    graph = model.graph
    produced = {o for i in nodes for o in graph.node[i].output}
    initializers = {t.name: t for t in graph.initializer}
    needed = list(dict.fromkeys(x for i in nodes for x in graph.node[i].input if x and x not in produced))
    inputs = [x for x in needed if x not in initializers]
    missing = [x for x in inputs if x not in values or types.get(x) not in ONNX_DTYPES]
    if missing:
        raise ConvfuseError(f"no value for {', '.join(missing)}")
    sub = onnx.helper.make_graph(
        [graph.node[i] for i in nodes],
        f"{graph.name}-region",
        [onnx.helper.make_tensor_value_info(x, types[x], None) for x in inputs],
        [onnx.helper.make_tensor_value_info(output, types[output], None)],
        [initializers[x] for x in needed if x in initializers],
    )
    region = onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    region.functions.extend(model.functions)
    bf16 = frozenset(x for x in inputs if types[x] == onnx.TensorProto.BFLOAT16)
    feed = {x: _as_fed(values[x], types[x]) for x in inputs}
    (got,) = rt.run(rt.session(region, device, "region"), feed, [output], "region", bfloat16=bf16).values()
    dtype = _dtype(types[output])
    return judge(output, device, dtype, dtype, [expected], [got], rtol, atol)


def _as_fed(value: np.ndarray, elem_type: int) -> np.ndarray:
    """A value in the form an input of ``elem_type`` is fed: bfloat16 run outputs back to bits."""
    if elem_type == onnx.TensorProto.BFLOAT16 and value.dtype.kind == "f":
        return rt.bfloat16_bits(value)  # exact: the values came from bfloat16
    return value


def _dtype(elem_type: int) -> str:
    return Port("", elem_type, None).dtype


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> index of the node that produces it."""
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} #{index}"


def _region(
    graph: onnx.GraphProto, producers: Mapping[str, int], tensor: str, boundary: Callable[[str], bool]
) -> tuple[list[int], set[str]]:
    """Nodes computing ``tensor`` back to ``boundary`` tensors or graph inputs, and the boundaries met."""
    nodes: set[int] = set()
    reached: set[str] = set()
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != tensor and boundary(name):
            reached.add(name)
            continue
        index = producers.get(name)
        if index is not None and index not in nodes:
            nodes.add(index)
            stack.extend(i for i in graph.node[index].input if i)
    return sorted(nodes), reached


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor that ONNX shape inference can type."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # a convenience here: tensors it cannot type are left out and noted
        graph = model.graph
    return {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.input, *graph.output, *graph.value_info]
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
    }


def _with_outputs(model: onnx.ModelProto, extra: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``extra`` (name -> element type)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, elem_type, None)
        for name, elem_type in extra.items()
        if name not in present
    )
    return out
