"""A small IR for linear regions of torch models, and their reduction to as few convs as pay.

The torch front ends (``nn.Sequential`` and ``torch.fx``) turn layers into :class:`LinearOp`
values and regions into step lists: a step is one op or a :class:`SumStep` of branches that all
read the step's input. :func:`reduce_region` folds a region with the rules of
:mod:`convfuse.algebra` and returns :data:`Piece` values to write back: a merged conv, an
original op kept as it is, or branches that are still summed. No graph types here; each op
carries an opaque ``origin`` the front end uses to write it back unchanged.

Arithmetic runs in float64 numpy (ops are built in float64; torch constants are converted
here, at the edge) and merged convs are cast back to the model's dtype and device once, when
the front end writes them (:attr:`Merged.dtype`, :attr:`Merged.device`).

Under the ``latency`` policy every candidate is timed from its specs (:mod:`convfuse.latency`):
each unit carries its original layers as a :data:`~convfuse.latency.Block` and the shape it
reads (batch and spatial dims known only when the front end propagated shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence, Union

import numpy as np
import torch

from ..algebra import ChannelAffine, Cost, add, affine_conv, average_pool, compose, cost, identity, then_affine
from ..decline import Decline, Reason
from ..latency import Block, Candidate, Parallel, Shape, Timing
from ..policy import Decision, Judge, Policy
from ..report import Report
from ..spec import ConvSpec

__all__ = [
    "TensorInfo",
    "LinearOp",
    "ConvOp",
    "AffineOp",
    "IdentityOp",
    "PadOp",
    "PoolOp",
    "SumStep",
    "Step",
    "Merged",
    "Kept",
    "Branches",
    "Piece",
    "Reduction",
    "reduce_region",
    "region_info",
    "is_changed",
    "module_count",
]

_F64 = np.float64


@dataclass(frozen=True)
class TensorInfo:
    """What a region knows about the tensor flowing into a step."""

    channels: int
    ndim: int
    dtype: torch.dtype  # the model's dtype; merged convs are cast back to it
    device: Any  # torch.device of the model's weights
    batch: int | None = None  # known from shape propagation only (latency timing)
    spatial: tuple[int, ...] | None = None

    def with_channels(self, channels: int) -> TensorInfo:
        return replace(self, channels=channels)

    @property
    def shape(self) -> Shape:
        """``[N, C, *spatial]`` with ``None`` where unknown."""
        return (self.batch, self.channels, *(self.spatial or (None,) * self.ndim))

    def after(self, m: Math) -> TensorInfo:
        """The tensor ``m`` produces from this one."""
        if not isinstance(m, ConvSpec):
            return self
        spatial = None if self.spatial is None else m.output_size(self.spatial)
        return replace(self, channels=m.out_channels, spatial=spatial)


Math = Union[ConvSpec, ChannelAffine, None]  # None: the identity map


# --------------------------------------------------------------------------- ops
@dataclass(eq=False)
class LinearOp:
    """One layer of the model that is a linear map; ``origin`` lets the front end keep it as is."""

    name: str
    origin: Any = field(default=None, repr=False)

    #: Spatial rank this op fixes (convs, typed pools and pads), or None.
    def fixed_ndim(self) -> int | None:
        return None

    #: Channels this op requires at its input, or None when it preserves any channel count.
    def in_channels(self) -> int | None:
        return None

    def build(self, info: TensorInfo) -> Math | Decline:
        """The op as float64 math for an input described by ``info``."""
        raise NotImplementedError

    def cost(self, info: TensorInfo, math_: Math) -> Cost:
        """Cost of the op as it stands in the model, per position of its output."""
        return _math_cost(math_, info)


@dataclass(eq=False)
class ConvOp(LinearOp):
    """A convolution layer."""

    spec: ConvSpec | None = None
    dtype: Any = None  # torch dtype of the layer's weights (the spec holds a numpy view)
    device: Any = None

    def fixed_ndim(self) -> int | None:
        return self.spec.ndim

    def in_channels(self) -> int | None:
        return self.spec.in_channels

    def build(self, info: TensorInfo) -> Math | Decline:
        s = self.spec
        if s.ndim != info.ndim:
            return Decline(Reason.RANK_MISMATCH, f"{self.name} is a {s.ndim}D conv on a {info.ndim}D tensor")
        if s.in_channels != info.channels:
            return Decline(
                Reason.CHANNEL_MISMATCH, f"{self.name} expects {s.in_channels} channels, gets {info.channels}"
            )
        dtype = self.dtype if self.dtype is not None else s.dtype
        if str(dtype).removeprefix("torch.") != str(info.dtype).removeprefix("torch."):
            return Decline(Reason.DTYPE, f"{self.name} holds {dtype} weights in a {info.dtype} region")
        return s.to(_F64)


@dataclass(eq=False)
class AffineOp(LinearOp):
    """``y = scale * x + shift`` with per-channel or scalar constants (BN, Mul/Add/Sub/Div, neg).

    ``vector`` says the constants are ``[C]`` vectors along the channel dim (BatchNorm);
    otherwise they are broadcast against ``[N, C, *spatial]`` as torch would.
    """

    scale: torch.Tensor | float | None = None
    shift: torch.Tensor | float | None = None
    vector: bool = False
    ndim: int | None = None

    def fixed_ndim(self) -> int | None:
        return self.ndim

    def in_channels(self) -> int | None:
        sizes = {_channel_size(t, self.vector) for t in (self.scale, self.shift)} - {None}
        return sizes.pop() if len(sizes) == 1 else None

    def build(self, info: TensorInfo) -> Math | Decline:
        scale = _per_channel(self.scale, info, self.vector, self.name, 1.0)
        if isinstance(scale, Decline):
            return scale
        shift = _per_channel(self.shift, info, self.vector, self.name, 0.0)
        if isinstance(shift, Decline):
            return shift
        return ChannelAffine(scale=scale, shift=shift)


@dataclass(eq=False)
class IdentityOp(LinearOp):
    """Identity, eval-mode Dropout, add of zero: transparent."""

    def build(self, info: TensorInfo) -> Math | Decline:
        return None


@dataclass(eq=False)
class PadOp(LinearOp):
    """Zero padding of the last ``len(pads)`` spatial dims, ``pads`` in dim order."""

    pads: tuple[tuple[int, int], ...] = ()
    ndim: int | None = None

    def fixed_ndim(self) -> int | None:
        return self.ndim

    def build(self, info: TensorInfo) -> Math | Decline:
        if len(self.pads) > info.ndim:
            return Decline(Reason.UNSUPPORTED, f"{self.name} pads {len(self.pads)} dims of a {info.ndim}D tensor")
        pads = ((0, 0),) * (info.ndim - len(self.pads)) + tuple(self.pads)
        return identity(info.channels, info.ndim, _F64).replace(pads=pads)

    def cost(self, info: TensorInfo, math_: Math) -> Cost:
        return Cost(0, 0)


@dataclass(eq=False)
class PoolOp(LinearOp):
    """Average pooling whose padding counts in the divisor (a uniform depthwise conv)."""

    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    pads: tuple[tuple[int, int], ...] = ()

    def fixed_ndim(self) -> int | None:
        return len(self.kernel)

    def build(self, info: TensorInfo) -> Math | Decline:
        if len(self.kernel) != info.ndim:
            return Decline(Reason.RANK_MISMATCH, f"{self.name} pools {len(self.kernel)}D on a {info.ndim}D tensor")
        return average_pool(info.channels, self.kernel, self.stride, self.pads, _F64)

    def cost(self, info: TensorInfo, math_: Math) -> Cost:
        return Cost(info.channels * math.prod(self.kernel), 0)


@dataclass(eq=False)
class SumStep:
    """Branches that all read the same tensor, summed (``+``, ``torch.add``, ``sum``, ``-``)."""

    branches: list[list[Step]]
    name: str = "add"


Step = Union[LinearOp, SumStep]


# --------------------------------------------------------------------------- pieces to write back
@dataclass(eq=False)
class Merged:
    """Write one conv computing ``spec`` (None: the layers were transparent, write nothing)."""

    spec: ConvSpec | None
    sources: tuple[str, ...]
    kind: str
    before: Cost
    after: Cost
    note: str = ""
    timing: Timing | None = None  # measured under the latency policy
    dtype: Any = None  # torch dtype and device to write the conv in (the spec is float64 numpy)
    device: Any = None


@dataclass(eq=False)
class Kept:
    """Write the original op back unchanged."""

    op: LinearOp


@dataclass(eq=False)
class Branches:
    """Branches of the same input, still summed after reduction."""

    branches: list[list[Piece]]


Piece = Union[Merged, Kept, Branches]


@dataclass
class Reduction:
    """The pieces a region reduces to; ``changed`` is False when writing back would be a no-op."""

    pieces: list[Piece]
    changed: bool


def is_changed(pieces: Sequence[Piece]) -> bool:
    """True when some piece merges layers."""
    for p in pieces:
        if isinstance(p, Merged):
            return True
        if isinstance(p, Branches) and any(is_changed(b) for b in p.branches):
            return True
    return False


def module_count(spec: ConvSpec | None) -> int:
    """Layers ``torch_layers.conv_from_spec`` writes for ``spec`` (pad + conv when asymmetric)."""
    if spec is None:
        return 0
    return 1 if all(b == e for b, e in spec.pads) else 2


# --------------------------------------------------------------------------- helpers: constants
def _channel_size(value: torch.Tensor | float | None, vector: bool) -> int | None:
    """The channel count a constant pins down, if any (its one non-unit dim)."""
    if not isinstance(value, torch.Tensor) or value.numel() == 1:
        return None
    if vector:
        return int(value.numel())
    big = [int(n) for n in value.shape if n != 1]
    return big[0] if len(big) == 1 else None


def _per_channel(
    value: torch.Tensor | float | None, info: TensorInfo, vector: bool, name: str, neutral: float
) -> np.ndarray | Decline:
    """A constant as a ``[C]`` float64 numpy vector, or why broadcasting it is not per channel."""
    c = info.channels
    if value is None:
        return np.full(c, neutral, dtype=_F64)
    if not isinstance(value, torch.Tensor):
        if not math.isfinite(float(value)):
            return Decline(Reason.NON_FINITE, f"{name} uses the constant {value}")
        return np.full(c, float(value), dtype=_F64)
    t = value.detach()
    if t.is_complex() or t.dtype == torch.bool:
        return Decline(Reason.DTYPE, f"{name} multiplies by a {t.dtype} constant")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return Decline(Reason.NON_FINITE, f"{name} uses a constant with inf or nan values")
    if t.is_floating_point() and t.dim() > 0 and t.dtype != info.dtype:
        return Decline(Reason.DTYPE, f"{name} uses a {t.dtype} constant on a {info.dtype} tensor")
    if t.numel() == 1 and (vector or t.dim() <= info.ndim + 2):
        return np.full(c, float(t.reshape(())), dtype=_F64)
    if vector:
        shape_ok = t.dim() == 1 and t.numel() == c
    else:
        rank = info.ndim + 2
        shape = (1,) * (rank - t.dim()) + tuple(t.shape) if t.dim() <= rank else None
        shape_ok = shape is not None and shape[1] == c and all(n == 1 for i, n in enumerate(shape) if i != 1)
    if not shape_ok:
        return Decline(
            Reason.CHANNEL_MISMATCH,
            f"{name} uses a constant of shape {tuple(t.shape)}, not one value per channel of a "
            f"[N, {c}, ...] tensor with {info.ndim} spatial dims",
        )
    return t.reshape(c).to(device="cpu", dtype=torch.float64).numpy()


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy one (a spec built without a layer's own dtype)."""
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | str:
    """The numpy dtype of a torch one, or its name where numpy has none (bfloat16: no timing model)."""
    name = str(dtype).removeprefix("torch.")
    try:
        return np.dtype(name)
    except TypeError:
        return name


def _as_spec(m: Math, info: TensorInfo) -> ConvSpec:
    """Any math as a conv: identity is a Dirac kernel, an affine a depthwise 1x1."""
    if m is None:
        return identity(info.channels, info.ndim, _F64)
    if isinstance(m, ChannelAffine):
        return affine_conv(m, info.ndim)
    return m


def _math_cost(m: Math, info: TensorInfo) -> Cost:
    if m is None:
        return Cost(0, 0)
    return cost([_as_spec(m, info)])


def _stride(m: Math, ndim: int) -> tuple[int, ...]:
    return m.stride if isinstance(m, ConvSpec) else (1,) * ndim


def _out_channels(m: Math, info: TensorInfo) -> int:
    return m.out_channels if isinstance(m, ConvSpec) else info.channels


# --------------------------------------------------------------------------- resolving shapes
def _walk(steps: Sequence[Step]):
    for s in steps:
        if isinstance(s, SumStep):
            for b in s.branches:
                yield from _walk(b)
        else:
            yield s


def _source_channels(steps: Sequence[Step]) -> int | None:
    """Channels of a region's input, from the first op that pins them."""
    for s in steps:
        if isinstance(s, SumStep):
            found = [c for c in (_source_channels(b) for b in s.branches) if c is not None]
            if found:
                return found[0]
            continue
        if isinstance(s, AffineOp) and not s.vector:
            continue  # a broadcast constant's one non-unit dim may be spatial: not trusted here
        c = s.in_channels()
        if c is not None:
            return c
    return None


def region_info(
    steps: Sequence[Step], shape: Sequence[int] | None = None, dtype: torch.dtype | None = None
) -> TensorInfo | None:
    """Describe the input of ``steps``; ``shape``/``dtype`` (from shape propagation) win when given.

    None when the region holds no conv or pooling (it is not a conv run), or its rank or
    channels cannot be told.
    """
    ops = list(_walk(steps))
    if not any(isinstance(op, (ConvOp, PoolOp)) for op in ops):
        return None
    convs = [op for op in ops if isinstance(op, ConvOp)]
    device = convs[0].device if convs and convs[0].device is not None else torch.device("cpu")
    if shape is not None:
        if len(shape) < 3:
            return None
        dims = tuple(int(d) for d in shape)
        return TensorInfo(dims[1], len(dims) - 2, dtype or torch.get_default_dtype(), device, dims[0], dims[2:])
    ndim = next(op.fixed_ndim() for op in ops if isinstance(op, (ConvOp, PoolOp)))
    channels = _source_channels(steps)
    if channels is None:
        return None
    vectors = [op.scale for op in ops if isinstance(op, AffineOp) and op.vector and isinstance(op.scale, torch.Tensor)]
    if convs:
        dtype = convs[0].dtype if convs[0].dtype is not None else _torch_dtype(convs[0].spec.dtype)
    else:
        dtype = vectors[0].dtype if vectors else torch.get_default_dtype()
    return TensorInfo(channels, ndim, dtype, device)


# --------------------------------------------------------------------------- units and folding
@dataclass(eq=False)
class _Unit:
    """A step reduced to one linear map: an original op, or branches merged into one conv."""

    math: Math
    sources: tuple[str, ...]
    before: Cost  # cost of the original layers, per output position of this unit
    stride: tuple[int, ...]
    info_out: TensorInfo
    pieces: list[Piece]  # how to write the unit alone
    n_ops: int  # original layers it replaces
    kind: str  # "op", "sum"
    note: str = ""
    n_pads: int = 0  # of which zero-padding layers
    layers: Block = ()  # the original layers, for timing
    shape_in: Shape = ()  # the tensor the unit reads, for timing


@dataclass(eq=False)
class _Barrier:
    """Pieces nothing folds across: branches that did not merge into one conv, or an op that
    is not a per-channel map of this tensor (kept as it is)."""

    pieces: list[Piece]
    info_out: TensorInfo


def _then(acc: Math, nxt: Math, info: TensorInfo) -> tuple[Math | Decline, str]:
    """``nxt`` after ``acc`` as one map (float64), and a note on the padding case used."""
    if nxt is None:
        return acc, ""
    if acc is None:
        return nxt, ""
    if isinstance(acc, ChannelAffine) and isinstance(nxt, ChannelAffine):
        if acc.channels != nxt.channels:
            return Decline(Reason.CHANNEL_MISMATCH, f"affines of {acc.channels} and {nxt.channels} channels"), ""
        return ChannelAffine(nxt.scale * acc.scale, nxt.scale * acc.shift + nxt.shift), ""
    first = _as_spec(acc, info)
    if isinstance(nxt, ChannelAffine):
        return then_affine(first, nxt), ""
    note = ""
    if nxt.is_padded:
        note = "padding case 1: later zero padding moved in front of a pointwise conv with zero bias"
    return compose(first, nxt), note


def _worth_writing(seg: Sequence[_Unit], merged: ConvSpec | None) -> bool:
    """A merge that removes a layer: two compute layers become one, or the written form
    (pad + conv for asymmetric pads) has fewer layers. ``ZeroPad -> Conv`` written back as
    ``Sequential(ZeroPad, Conv)`` is not a merge, so fusing a fused model again is a no-op."""
    n_ops = sum(u.n_ops for u in seg)
    return n_ops - sum(u.n_pads for u in seg) > 1 or n_ops > module_count(merged)


def _chain_cost(units: Sequence[_Unit]) -> Cost:
    """Cost of units run one after another, per output position of the last (algebra.cost)."""
    macs, params, factor = 0.0, 0, 1
    for u in reversed(units):
        macs += u.before.macs * factor
        params += u.before.params
        factor *= math.prod(u.stride)
    return Cost(int(round(macs)), params)


def _layers(m: Math, info: TensorInfo) -> Block:
    """An op's math as the layers a timing model runs (none for the identity)."""
    return () if m is None else (_as_spec(m, info),)


class _Reducer:
    """Folds a region's steps with the algebra under a policy; records declines in a report."""

    def __init__(self, judge: Judge, report: Report) -> None:
        self.judge = judge
        self.report = report

    def _decide(
        self, before: Cost, merged: ConvSpec | None, layers: Block, shape: Shape, dtype: torch.dtype
    ) -> Decision:
        """The judge on replacing ``layers`` (reading ``shape``) by ``merged`` (None: by nothing)."""
        if merged is None:
            return Decision(None)
        candidate = Candidate(layers, merged, shape, _numpy_dtype(dtype)) if self.judge.times else None
        return self.judge.decide(before, cost([merged]), candidate)

    # ------------------------------------------------------------------ steps
    def steps(self, steps: Sequence[Step], info: TensorInfo) -> tuple[list[Piece], TensorInfo, _Unit | None] | Decline:
        """Reduce ``steps`` read from a tensor ``info``: pieces, output info, and the single unit
        the whole list folds to (None when it needs more than one piece)."""
        items: list[_Unit | _Barrier] = []
        cur = info
        for step in steps:
            item = self.sum(step, cur) if isinstance(step, SumStep) else self.op(step, cur)
            if isinstance(item, Decline):
                if not (isinstance(step, AffineOp) and step.in_channels() in (None, cur.channels)):
                    return item
                # A constant that is not one value per channel: keep the op, fold around it.
                self.report.declined((step.name,), item)
                item = _Barrier([Kept(step)], cur)
            items.append(item)
            cur = item.info_out
        if not items:
            empty = _Unit(None, (), Cost(0, 0), (1,) * info.ndim, info, [], 0, "op", shape_in=info.shape)
            return [], info, empty
        pieces: list[Piece] = []
        single: _Unit | None = None
        run: list[_Unit] = []
        runs_done = 0
        for item in items + [None]:
            if isinstance(item, _Unit):
                run.append(item)
                continue
            if run:
                seg_pieces, seg_single = self.chain(run)
                pieces += seg_pieces
                single = seg_single
                runs_done += 1
                run = []
            if isinstance(item, _Barrier):
                pieces += item.pieces
                runs_done += 1
        whole = single if runs_done == 1 and single is not None else None
        return pieces, cur, whole

    def op(self, op: LinearOp, info: TensorInfo) -> _Unit | Decline:
        m = op.build(info)
        if isinstance(m, Decline):
            return m
        return _Unit(
            math=m,
            sources=(op.name,),
            before=op.cost(info, m),
            stride=_stride(m, info.ndim),
            info_out=info.after(m),
            pieces=[Kept(op)],
            n_ops=1,
            kind="op",
            n_pads=int(isinstance(op, PadOp)),
            layers=_layers(m, info),
            shape_in=info.shape,
        )

    # ------------------------------------------------------------------ parallel sum
    def sum(self, step: SumStep, info: TensorInfo) -> _Unit | _Barrier | Decline:
        """Group the branches greedily into as few convs as are exact and pay; one group: a unit.

        A branch enters the grouping as its exact fold, whatever it costs alone (a 1x1 -> avg
        pool branch is dearer as one conv, but free once summed into a kxk); the policy judges
        each group against all the original layers in it. A branch left alone is reduced
        under the policy as a chain of its own.
        """
        exact = _Reducer(Judge(Policy.ALWAYS), Report())  # quiet: only the whole-branch fold is wanted
        folded = []
        for branch in step.branches:
            r = exact.steps(branch, info)
            if isinstance(r, Decline):
                return r
            folded.append(r)
        outs = {r[1].channels for r in folded}
        if len(outs) != 1:
            return Decline(Reason.CHANNEL_MISMATCH, f"{step.name} sums branches of {sorted(outs)} channels (broadcast)")
        info_out = folded[0][1]
        groups: list[list[int]] = []  # branch indices
        specs: list[ConvSpec] = []  # merged spec of each group
        decisions: list[Decision] = []  # the judge's answer on each group
        loose: list[int] = []  # branches that fold to no single conv
        units = [r[2] for r in folded]

        def decide(members: list[_Unit], cand: ConvSpec) -> Decision:
            before = sum((u.before for u in members), Cost(0, 0))
            layers: Block = (Parallel(tuple(u.layers for u in members)),)
            return self._decide(before, cand, layers, info.shape, info.dtype)

        if all(u is not None for u in units):  # the usual case: everything merges at once
            cand = add([_as_spec(u.math, info) for u in units])
            if not isinstance(cand, Decline):
                decision = decide(units, cand)
                if decision.decline is None:
                    groups, specs, decisions = [list(range(len(units)))], [cand], [decision]
                    units = []  # grouping done
        for bi, unit in enumerate(units):
            if unit is None:
                loose.append(bi)
                continue
            spec_u = _as_spec(unit.math, info)
            first_no: Decline | None = None
            for gi, group in enumerate(groups):
                cand = add([_as_spec(units[i].math, info) for i in group] + [spec_u])
                if not isinstance(cand, Decline):
                    decision = decide([units[i] for i in group + [bi]], cand)
                    if decision.decline is None:
                        group.append(bi)
                        specs[gi] = cand
                        decisions[gi] = decision
                        break
                    cand = decision.decline
                first_no = first_no or cand
            else:
                if first_no is not None:
                    others = tuple(s for i in groups[0] for s in units[i].sources)
                    self.report.declined(others + unit.sources, first_no)
                groups.append([bi])
                specs.append(spec_u)
                decisions.append(Decision(None))
        units = [r[2] for r in folded]
        if len(groups) == 1 and not loose:
            group = [units[i] for i in groups[0]]
            spec = specs[0]
            sources = tuple(s for u in group for s in u.sources)
            before = sum((u.before for u in group), Cost(0, 0))
            n_ops = sum(u.n_ops for u in group) + len(group) - 1
            decision = decisions[0]
            piece = Merged(
                spec, sources, "sum", before, cost([spec]), decision.note, decision.timing, info.dtype, info.device
            )
            notes = "; ".join(sorted({u.note for u in group if u.note}))
            layers: Block = (Parallel(tuple(u.layers for u in group)),)
            return _Unit(
                spec, sources, before, spec.stride, info_out, [piece], n_ops, "sum", notes,
                layers=layers, shape_in=info.shape,
            )  # fmt: skip
        branch_pieces: list[list[Piece]] = []
        for group, spec, decision in zip(groups, specs, decisions):
            if len(group) > 1:
                members = [units[i] for i in group]
                srcs = tuple(s for u in members for s in u.sources)
                before = sum((u.before for u in members), Cost(0, 0))
                merged = Merged(
                    spec, srcs, "sum", before, cost([spec]), decision.note, decision.timing, info.dtype, info.device
                )
                branch_pieces.append([merged])
        for bi in [g[0] for g in groups if len(g) == 1] + loose:
            r = self.steps(step.branches[bi], info)  # alone: reduce it under the policy
            if isinstance(r, Decline):
                return r
            branch_pieces.append(r[0])
        return _Barrier([Branches(branch_pieces)], info_out)

    # ------------------------------------------------------------------ sequential chain
    def chain(self, units: list[_Unit]) -> tuple[list[Piece], _Unit | None]:
        """Split a chain into the fewest segments that each fold exactly and pay (dynamic
        programming over split points); report why each boundary was not merged."""
        n = len(units)
        folds: list[list[Math | Decline | None]] = [[None] * n for _ in range(n)]
        notes: list[list[str]] = [[""] * n for _ in range(n)]
        decided: list[list[Decision | None]] = [[None] * n for _ in range(n)]
        why: list[list[Decline | None]] = [[None] * n for _ in range(n)]
        ok = [[False] * n for _ in range(n)]
        for i in range(n):
            acc: Math = units[i].math
            folds[i][i] = acc
            ok[i][i] = True
            note = units[i].note
            info = units[i].info_out  # info at the output of acc, used to view acc as a spec
            info_in = self._info_in(units, i)
            for j in range(i + 1, n):
                nxt, n_note = _then(acc, units[j].math, info_in)
                if isinstance(nxt, Decline):
                    for k in range(j, n):
                        why[i][k] = nxt
                    break
                acc = nxt
                note = "; ".join(x for x in (note, n_note, units[j].note) if x)
                folds[i][j] = acc
                notes[i][j] = note
                seg = units[i : j + 1]
                merged_spec = None if acc is None else _as_spec(acc, info_in)
                layers = tuple(layer for u in seg for layer in u.layers)
                shape = (units[i].shape_in[0], info_in.channels, *units[i].shape_in[2:])
                decision = self._decide(_chain_cost(seg), merged_spec, layers, shape, info_in.dtype)
                decided[i][j] = decision
                if decision.decline is not None:
                    why[i][j] = decision.decline
                    continue
                ok[i][j] = _worth_writing(seg, merged_spec)
        # best[j]: (segments, macs, params, split) for units[:j]
        best: list[tuple[int, int, int, int] | None] = [None] * (n + 1)
        best[0] = (0, 0, 0, -1)
        for j in range(1, n + 1):
            for i in range(j):
                if not ok[i][j - 1] or best[i] is None:
                    continue
                seg_cost = self._segment_cost(units, i, j - 1, folds[i][j - 1])
                cand = (best[i][0] + 1, best[i][1] + seg_cost.macs, best[i][2] + seg_cost.params, i)
                if best[j] is None or cand[:3] < best[j][:3]:
                    best[j] = cand
        bounds = []
        j = n
        while j > 0:
            i = best[j][3]
            bounds.append((i, j - 1))
            j = i
        bounds.reverse()
        pieces: list[Piece] = []
        for idx, (i, j) in enumerate(bounds):
            if idx + 1 < len(bounds):
                nj = bounds[idx + 1][1]
                reason = why[i][nj]
                if reason is not None:
                    srcs = tuple(s for u in units[i : nj + 1] for s in u.sources)
                    self.report.declined(srcs, reason)
            if i == j:
                pieces += units[i].pieces
                continue
            pieces.append(self._merged(units, i, j, folds[i][j], notes[i][j], decided[i][j]))
        if len(bounds) != 1:
            return pieces, None
        i, j = bounds[0]
        if i == j:
            return pieces, units[i]
        seg = units[i : j + 1]
        m = folds[i][j]
        merged = pieces[0]
        return pieces, _Unit(
            m,
            merged.sources,
            merged.before,
            _stride(m, seg[0].info_out.ndim),
            seg[-1].info_out,
            pieces,
            sum(u.n_ops for u in seg),
            "sum" if any(u.kind == "sum" for u in seg) else "op",
            notes[i][j],
            sum(u.n_pads for u in seg),
            tuple(layer for u in seg for layer in u.layers),
            seg[0].shape_in,
        )

    def _info_in(self, units: Sequence[_Unit], i: int) -> TensorInfo:
        """Input info of ``units[i]``: channels of the map's input."""
        u = units[i]
        m = u.math
        c = m.in_channels if isinstance(m, ConvSpec) else u.info_out.channels
        return u.info_out.with_channels(c)

    def _segment_cost(self, units: Sequence[_Unit], i: int, j: int, m: Math) -> Cost:
        if i == j:
            return units[i].before
        return _math_cost(m, self._info_in(units, i))

    def _merged(
        self, units: Sequence[_Unit], i: int, j: int, m: Math, note: str, decision: Decision | None
    ) -> Merged:
        seg = units[i : j + 1]
        info_in = self._info_in(units, i)
        sources = tuple(s for u in seg for s in u.sources)
        kinds = [u.kind for u in seg]
        maths = [u.math for u in seg]
        if all(x is None for x in maths[1:]) and len(seg) > 1 and kinds == ["op"] * len(seg):
            kind = "identity" if maths[0] is None else "chain"
        elif "sum" in kinds:
            kind = "sum" if len(seg) == 1 else "sum+chain"
        elif all(isinstance(x, ChannelAffine) or x is None for x in maths[1:]):
            kind = "conv+affine"
        else:
            kind = "chain"
        if all(x is None for x in maths):
            return Merged(None, sources, "identity", Cost(0, 0), Cost(0, 0), note)
        spec = _as_spec(m, info_in)
        timing = None
        if decision is not None:
            note = "; ".join(x for x in (note, decision.note) if x)
            timing = decision.timing
        return Merged(
            spec, sources, kind, _chain_cost(seg), cost([spec]), note, timing, info_in.dtype, info_in.device
        )


def reduce_region(
    steps: Sequence[Step], info: TensorInfo, policy: Policy | str | Judge, report: Report
) -> Reduction | Decline:
    """Reduce a linear region read from a tensor ``info`` to pieces; declines go to ``report``.

    A Decline is returned (not recorded) when the region as a whole cannot be described
    (an op that does not fit the tensor); the caller reports it and leaves the region alone.
    """
    r = _Reducer(Judge.of(policy), report).steps(steps, info)
    if isinstance(r, Decline):
        return r
    pieces = r[0]
    return Reduction(pieces, is_changed(pieces))
