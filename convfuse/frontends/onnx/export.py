"""The ONNX exporter (rule 2, linear regions): :func:`convfuse.planner.plan` called on the imported
graph and its plan written back: each merge one Conv, each sum left with fewer terms rebuilt
from Add/Sub (or one Sum), regrouped merges reshaped back.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from ...decline import Decline, Reason
from ...ir import REGROUP
from ...planner import Merge, Resum, plan
from ...transpose import ConvTransposeSpec
from .importer import _linear_graph, _stale_shape_reads
from .index import _Declines, _Index, _Rewrite, _State
from .nodes import FLOAT_TYPES, NewTensor, conv_node, linear_nodes, mark_merged
from .ring import ring_nodes
from .transpose import transpose_node


def _elem_type(merge: Merge) -> int | None:
    for node in merge.nodes:
        if node.kind.is_anchor and node.origin[1] is not None:
            return node.origin[1].elem_type
    return None


def merge_regions(
    index: _Index, graph: onnx.GraphProto, state: _State, declines: _Declines
) -> list[onnx.NodeProto] | None:
    """Rule 2: every linear region planned by :func:`convfuse.planner.plan`, written back as Conv
    nodes (and the sums left with fewer terms) - the ONNX exporter."""
    ir = _linear_graph(index, state)
    if not any(n.kind.is_anchor for n in ir.nodes):
        return None
    elem = next((n.origin[1].elem_type for n in ir.nodes if n.kind.is_anchor and n.origin[1].elem_type), None)
    result = plan(ir, state.judge, FLOAT_TYPES.get(elem or 0, None))
    declines.extend(result.declines)
    position = {id(n): k for k, n in enumerate(index.nodes)}
    built: dict[int, tuple[list[onnx.NodeProto], list[NewTensor]]] = {}
    failed: set[str] = set()
    for y in _stale_shape_reads(index, result.merges):
        merge = next(m for m in result.merges if m.y == y)
        declines.append(
            (
                list(merge.sources),
                Decline(
                    Reason.SHARED_TENSOR,
                    "a Shape node reads a tensor inside this merge for a Reshape it keeps",
                ),
            )
        )
        failed.add(y)
    for merge in result.merges:
        first = next(n for n in merge.nodes if n.kind.is_anchor)
        name = first.origin[0].name or state.names.fresh(f"Conv_{merge.y}")
        elem_type = _elem_type(merge)
        elem_type = elem_type or onnx.TensorProto.FLOAT
        if isinstance(merge.spec, ConvTransposeSpec):  # a merged transposed conv: one ConvTranspose
            written = transpose_node(
                merge.spec, name=name, x=merge.x, y=merge.y, elem_type=elem_type, fresh=state.names.fresh
            )
            made = written if isinstance(written, Decline) else ([written[0]], written[1])
        elif merge.linear:
            rank2 = len(index.shape(merge.x) or ()) == 2
            regroup = _regroup_back(index, merge, state.names.fresh)
            made = (
                regroup
                if isinstance(regroup, Decline)
                else linear_nodes(
                    merge.spec,
                    name=name,
                    x=merge.x,
                    y=merge.y if regroup is None else regroup[0].input[0],
                    elem_type=elem_type,
                    fresh=state.names.fresh,
                    rank2=rank2,
                )
            )
            if isinstance(regroup, tuple) and not isinstance(made, Decline):  # Decline regroup: Decline made
                made = ([*made[0], regroup[0]], [*made[1], *regroup[1]])
        else:
            conv_out = state.names.fresh(f"{merge.y}/conv") if merge.ring is not None else merge.y
            made = conv_node(
                merge.spec, name=name, x=merge.x, y=conv_out, elem_type=elem_type, fresh=state.names.fresh
            )
            made = made if isinstance(made, Decline) else ([made[0]], made[1])
            if merge.ring is not None and not isinstance(made, Decline):  # case 2: Conv + Add(ring)
                extra = ring_nodes(
                    merge.ring,
                    name=name,
                    x=merge.x,
                    conv_out=conv_out,
                    y=merge.y,
                    elem_type=elem_type,
                    opset=state.opset,
                    fresh=state.names.fresh,
                )
                made = extra if isinstance(extra, Decline) else (made[0] + extra[0], made[1] + extra[1])
        if isinstance(made, Decline):
            declines.append((list(merge.sources), made))
            failed.add(merge.y)
            continue
        built[id(merge)] = made
    resums = []
    for resum in result.resums:
        terms = {t for t, _ in resum.terms}
        if terms & failed or state.opset < 7 or any(c not in (1.0, -1.0) for _, c in resum.terms):
            if state.opset < 7:
                declines.append(
                    (
                        [n.name for n in resum.nodes],
                        Decline(
                            Reason.UNSUPPORTED, "opset < 7: rebuilding a partial sum needs broadcasting Add"
                        ),
                    )
                )
            failed |= terms
            continue
        resums.append(resum)
    rewrite = _Rewrite()
    for merge in result.merges:
        if id(merge) not in built or merge.y in failed:
            continue
        new_nodes, initializers = built[id(merge)]
        node = new_nodes[0]
        last = max((n.origin[0] for n in merge.nodes), key=lambda n: position[id(n)])
        for tensor in initializers:
            tensor.write(graph.initializer)
        state.created.update(t.name for t in initializers)
        mark_merged(node, merge.kind, [n.origin[0] for n in merge.nodes])
        rewrite.replace.setdefault(id(last), []).extend(new_nodes)
        rewrite.removed.update(id(n.origin[0]) for n in merge.nodes)
        state.merges += 1
        state.report.merged(
            merge.kind, list(merge.sources), node.name, merge.before, merge.after, merge.note, merge.timing
        )
    for resum in resums:
        roots = [n.origin[0] for n in resum.nodes]
        root = max(roots, key=lambda n: position[id(n)])
        rewrite.replace.setdefault(id(root), []).extend(_sum_nodes(resum, root, state))
        rewrite.removed.update(id(n) for n in roots)
    return rewrite.apply(index.nodes)


def _regroup_back(
    index: _Index, merge: Merge, fresh: Callable[[str], str]
) -> tuple[onnx.NodeProto, list[NewTensor]] | Decline | None:
    """A merged Linear keeps the leading dims of its input; when the reshapes it replaces end
    with other leading dims (``bn(linear(x).flatten(0, 1))`` read as it is), the node that gives
    them back: ``Flatten`` to a ``[N, C]`` output, else ``Reshape`` to the output's static shape.
    None when nothing is needed; a decline when the output's shape is not known."""
    if not any(n.layout == REGROUP for n in merge.nodes):
        return None
    producer = {n.output: n for n in merge.nodes}
    t = index.shape_source(merge.y)  # Reshape(v, Shape(t)): y has t's shape
    while t in producer and producer[t].kind.is_unary and producer[t].layout != REGROUP:
        t = producer[t].inputs[0]  # Linear, BN, affine keep the leading dims
    if t == merge.x:
        return None
    before, after = index.shape(merge.x), index.shape(merge.y)
    if before is not None and after is not None and before[:-1] == after[:-1]:
        if sum(d is None for d in before[:-1]) <= 1:  # the leading products agree: one unknown is equal
            return None
    mid = fresh(f"{merge.y}/linear")
    name = fresh(f"{merge.y}/regroup")
    if before is not None and after is not None and len(after) == 2:
        return helper.make_node("Flatten", [mid], [merge.y], name=name, axis=len(before) - 1), []
    if after is not None and None not in after:
        shape = NewTensor(fresh(f"{merge.y}/shape"), np.array(after, dtype=np.int64), onnx.TensorProto.INT64)
        return helper.make_node("Reshape", [mid, shape.name], [merge.y], name=name), [shape]
    return Decline(
        Reason.RANK_MISMATCH,
        f"the merged Linear layer keeps the leading dims of {merge.x!r}, which the reshapes it replaces "
        f"regroup, and the shape of {merge.y!r} is not known",
    )


def _sum_nodes(resum: Resum, root: onnx.NodeProto, state: _State) -> list[onnx.NodeProto]:
    """``y = sum c_i t_i`` with ``c_i`` in {1, -1}: one Sum, or a chain of Add/Sub (root's name last)."""
    terms = sorted(resum.terms, key=lambda tc: tc[1] < 0)  # a positive term first
    if root.op_type == "Sum" and all(c == 1 for _, c in terms) and len(terms) > 1:
        return [helper.make_node("Sum", [t for t, _ in terms], [resum.y], name=root.name)]
    out: list[onnx.NodeProto] = []
    acc = terms[0][0]
    if terms[0][1] < 0:
        neg = state.names.fresh(f"{resum.y}/neg")
        out.append(helper.make_node("Neg", [acc], [neg], name=state.names.fresh(f"{root.name or 'Neg'}/neg")))
        acc = neg
    if len(terms) == 1:
        out.append(helper.make_node("Identity", [acc], [resum.y], name=root.name))
        return out
    for k, (term, coef) in enumerate(terms[1:], start=1):
        last = k == len(terms) - 1
        y = resum.y if last else state.names.fresh(f"{resum.y}/partial{k}")
        name = root.name if last else state.names.fresh(f"{root.name or 'Add'}/partial{k}")
        out.append(helper.make_node("Add" if coef > 0 else "Sub", [acc, term], [y], name=name))
        acc = y
    return out
