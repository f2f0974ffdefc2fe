"""The torch importer: torch layers and fx nodes as the planner's IR (:mod:`convfuse.ir`).

Plumbing only. A :class:`~convfuse.frontends.torch.ops.LinearOp` (what :mod:`.torch_rules`
reads a layer or call as) becomes a :class:`~convfuse.ir.LinearNode` whose ``build`` gives the
op as a float64 ConvSpec; a sum of graph tensors a SUM node; ``torch.cat`` on channels a CONCAT
node. Parameters are keyed by the tensor's identity, so a module called twice is one weight.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import nn

from ...decline import Decline
from ...ir import REGROUP, LinearNode, OpKind, TensorInfo
from ...spec import ConvSpec
from .ops import AffineOp, ConvOp, DenseOp, IdentityOp, LinearOp, PadOp, PoolOp, RegroupOp, as_spec
from .ops import TensorInfo as TorchInfo

__all__ = ["op_kind", "op_node", "parameter_sizes"]

_KINDS: dict[type, OpKind] = {
    ConvOp: OpKind.CONV,
    AffineOp: OpKind.AFFINE,
    IdentityOp: OpKind.IDENTITY,
    PadOp: OpKind.PAD,
    PoolOp: OpKind.POOL,
    DenseOp: OpKind.LINEAR,
}


def op_kind(op: LinearOp) -> OpKind:
    own = getattr(type(op), "ir_kind", None)  # an op class naming its kind (ConvTransposeOp)
    if isinstance(own, OpKind):
        return own
    if isinstance(op, AffineOp) and op.vector:
        return OpKind.BATCHNORM
    for cls, kind in _KINDS.items():
        if isinstance(op, cls):
            return kind
    return getattr(op, "ir_kind", OpKind.AFFINE)


def _layout(op: LinearOp) -> str | None:
    """The IR layout: Linear on the last dim, BatchNorm (channels at dim 1), regrouping reshapes."""
    if isinstance(op, DenseOp):
        return "last"
    if isinstance(op, AffineOp) and op.vector:
        return "first"
    return REGROUP if isinstance(op, RegroupOp) else None


def parameter_sizes(*tensors: Any) -> dict[Hashable, int]:
    """Element counts of the ``nn.Parameter`` values among ``tensors`` (modules: their parameters)."""
    sizes: dict[Hashable, int] = {}
    for t in tensors:
        if isinstance(t, nn.Module):
            sizes.update((id(p), p.numel()) for p in t.parameters())
        elif isinstance(t, nn.Parameter):
            sizes[id(t)] = t.numel()
    return sizes


def op_node(
    op: LinearOp,
    x: str,
    y: str,
    dtype: torch.dtype,
    device: torch.device,
    weights: dict[Hashable, int],
    origin: Any,
) -> LinearNode:
    """``op`` reading tensor ``x`` and writing ``y`` as an IR node (``dtype``: the region's)."""

    def build(info: TensorInfo) -> ConvSpec | Decline:
        sizes = info.spatial
        spatial = tuple(int(d) for d in sizes if d is not None) if sizes and None not in sizes else None
        t = TorchInfo(info.channels, info.ndim, dtype, device, info.batch, spatial)
        math = op.build(t)
        return math if isinstance(math, Decline) else as_spec(math, t)

    trusted = not (isinstance(op, AffineOp) and not op.vector)  # a broadcast constant's dim may be spatial
    return LinearNode(
        op.name,
        op_kind(op),
        (x,),
        y,
        build,
        ndim=op.fixed_ndim(),
        in_channels=op.in_channels() if trusted else None,
        weights=weights,
        origin=origin,
        layout=_layout(op),
    )
