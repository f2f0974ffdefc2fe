"""The plan written back as layers: a merge becomes one conv or linear layer, and a Sequential's
merged run is replaced by its layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...ir import LinearGraph
from ...planner import Merge, plan
from ...transpose import ConvTransposeSpec
from .context import _Context
from .importer import op_node, parameter_sizes
from .layers import conv_from_spec, linear_from_spec, mark_provenance
from .ops import LinearOp, numpy_dtype, weight_dtype_device
from .ring import border_conv
from .surgery import carry_attributes
from .transpose import conv_transpose_from_spec


def layer_from_merge(merge: Merge, dtype: torch.dtype, device: Any, types: dict[str, str]) -> nn.Module:
    """The module a merge writes in the model's ``dtype`` on ``device``: a conv, or a Linear for
    a region of Linear layers, marked with the layers it replaces (``types``: their class names)."""
    if isinstance(merge.spec, ConvTransposeSpec):  # a merged transposed conv (with a Crop where needed)
        layer = conv_transpose_from_spec(merge.spec, device, dtype)
    else:
        make = linear_from_spec if merge.linear else conv_from_spec
        layer = make(merge.spec, dtype, device)
    if merge.ring is not None:  # case 2: the conv plus its border ring
        layer = border_conv(layer, merge.ring, dtype, device)
    return mark_provenance(layer, merge.sources, merge.kind, types)


def _write_run(
    run: list[tuple[str, nn.Module, list[LinearOp]]],
    ctx: _Context,
    out: list[tuple[str, nn.Module]],
    merges: list[tuple[int, Merge]],
) -> None:
    """Append the layers a run plans to (or the run unchanged) to ``out``."""
    unchanged = [(k, m) for k, m, _ in run]
    ops = [op for _, _, run_ops in run for op in run_ops]
    weights = [found for found in map(weight_dtype_device, ops) if found is not None]
    if not weights:
        out += unchanged
        return
    dtype, device = weights[0]
    args = ctx.shapes.get(ops[0].name)
    shapes: dict[str, Sequence[int | None]] = {"t0": ctx.known(args[0][0])} if args else {}
    nodes = [
        op_node(op, f"t{k}", f"t{k + 1}", dtype, device, parameter_sizes(op.origin[1]), op)
        for k, op in enumerate(ops)
    ]
    graph = LinearGraph(nodes, {f"t{len(ops)}"}, {f"t{len(ops)}"}, shapes, pad_layer=True)
    result = plan(graph, ctx.judge, numpy_dtype(dtype))
    for sources, decline in result.declines:
        ctx.report.declined(sources, decline)
    if not result.merges:
        out += unchanged
        return
    first = {id(m.nodes[0]): m for m in result.merges}
    merged = {id(n) for m in result.merges for n in m.nodes}
    for node in nodes:
        op = node.origin
        if id(node) in first:
            m = first[id(node)]
            merges.append((len(out), m))
            types = {o.name: type(o.origin[1]).__name__ for o in ops}
            merged_layer = layer_from_merge(m, dtype, device, types)
            carry_attributes(op.origin[1], merged_layer)
            out.append((op.origin[0], merged_layer))
        elif id(node) not in merged:
            out.append(op.origin)
