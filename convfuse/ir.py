"""The neutral description of a graph's linear nodes: what both front ends hand the planner.

Layout after onnx-graphsurgeon: each front end has an *importer* (ONNX graph or torch.fx graph
to :class:`LinearGraph`) and an *exporter* (a :class:`~convfuse.planner.Plan` written back as
ONNX nodes or fx nodes); this module is the IR between them and knows no framework.

A :class:`LinearGraph` holds only the nodes that are linear in their one activation input
(``OpKind`` UNARY: conv, BN, affine constants, zero pad, average pool, identity, Linear) or
that combine activations linearly (SUM with one coefficient per input, CONCAT along channels).
Tensors are named by strings; a tensor read by anything that is not a node of the graph (a
non-linear op, a graph output, a shape read) is ``external`` and is never merged away;
``outputs`` are the graph outputs among them (for the reason reported).

Adding an op kind: the front end's reader table gets one entry that returns a
:class:`LinearNode` whose ``build`` gives the op as a :class:`~convfuse.spec.ConvSpec` on its
input (or a :class:`~convfuse.transpose.ConvTransposeSpec`: any map type of
:mod:`convfuse.maps`); the planner needs nothing new unless the op combines tensors in a new way.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .decline import Decline
from .spec import ConvSpec
from .transpose import ConvTransposeSpec

__all__ = ["OpKind", "TensorInfo", "LinearNode", "LinearGraph", "REGROUP", "regroups"]

#: ``LinearNode.layout`` of a reshape that keeps the last dim and regroups the others
#: (:func:`regroups`): the identity on a Linear layer's features, not on a conv's channels.
REGROUP = "regroup"


class OpKind(str, Enum):
    """What a node is. UNARY nodes are a conv of their input; SUM and CONCAT combine inputs."""

    CONV = "conv"  # a real convolution (an anchor: regions without one are left alone)
    CONV_TRANSPOSE = "convtranspose"  # a transposed convolution (an anchor; its map a ConvTransposeSpec)
    LINEAR = "linear"  # a Linear / Gemm layer (an anchor)
    BATCHNORM = "batchnorm"  # inference BatchNorm: a per-channel affine
    AFFINE = "affine"  # Mul/Add/Sub/Div by constants, Neg: a per-channel or scalar affine
    PAD = "pad"  # zero padding
    POOL = "pool"  # average pooling counting its padding
    IDENTITY = "identity"  # Identity, eval Dropout, contiguous, regrouping reshapes
    SUM = "sum"  # sum_i coefs[i] * inputs[i] (Add, Sub, Sum)
    CONCAT = "concat"  # inputs stacked along channels

    @property
    def is_anchor(self) -> bool:
        """A layer that computes (a region of BatchNorms or pads alone is left as it is)."""
        return self in (OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.LINEAR, OpKind.POOL)

    @property
    def is_affine(self) -> bool:
        return self in (OpKind.BATCHNORM, OpKind.AFFINE)

    @property
    def is_unary(self) -> bool:
        return self not in (OpKind.SUM, OpKind.CONCAT)


@dataclass(frozen=True)
class TensorInfo:
    """What is known of a tensor inside a region: channels, spatial rank, and when the front
    end propagated shapes, the batch and spatial sizes."""

    channels: int
    ndim: int
    batch: int | None = None
    spatial: tuple[int | None, ...] | None = None

    @property
    def shape(self) -> tuple[int | None, ...]:
        """``[N, C, *spatial]`` with ``None`` where unknown."""
        return (self.batch, self.channels, *(self.spatial or (None,) * self.ndim))

    def after(self, spec: ConvSpec | ConvTransposeSpec) -> TensorInfo:
        """The tensor ``spec`` produces from this one."""
        spatial = None
        if self.spatial is not None and all(d is not None for d in self.spatial):
            spatial = spec.output_size([int(d) for d in self.spatial])  # type: ignore[arg-type]
        return TensorInfo(spec.out_channels, self.ndim, self.batch, spatial)


Build = Callable[[TensorInfo], "ConvSpec | ConvTransposeSpec | Decline"]


@dataclass(eq=False)
class LinearNode:
    """One linear node. ``build`` (UNARY only) gives the op as a float64 conv on an input
    described by a :class:`TensorInfo`, or why it cannot; ``coefs`` (SUM) one factor per input.

    ``ndim`` and ``in_channels`` are what the node itself fixes (a conv does, a BN fixes its
    channels, a scalar Mul nothing). ``weights`` names the stored parameters the node reads
    with their element counts: a parameter read by nodes outside a merge stays in the model,
    so it is not counted as saved (weight sharing is kept). ``refused`` marks a node that looks
    linear but cannot be merged (a non-constant weight, training-mode BN): it ends regions and
    its reason is reported next to the anchors it touches. ``origin`` is the front end's handle.
    ``layout``: ``"last"`` for a layer on the last dim (Linear, Gemm, MatMul), ``"first"`` for
    one that reads channels at dim 1 without fixing the rank (BatchNorm1d), :data:`REGROUP` for
    a reshape that keeps the last dim (an IDENTITY only where every layer reads the last dim),
    None otherwise.
    """

    name: str
    kind: OpKind
    inputs: tuple[str, ...]
    output: str
    build: Build | None = None
    coefs: tuple[float, ...] = ()
    ndim: int | None = None
    in_channels: int | None = None
    weights: dict[Hashable, int] = field(default_factory=dict)
    refused: Decline | None = None
    origin: Any = field(default=None, repr=False)
    layout: str | None = None  # "last": on the last dim (Linear); "first": channels at dim 1; REGROUP
    tag: str = ""  # the front end's word for the op in merge details ("bn", "mul"); default: kind


@dataclass
class LinearGraph:
    """The linear nodes of one graph, in topological order, and the tensors read outside them.

        ``shapes`` gives ``[N, C, *spatial]`` (``None`` where symbolic) for tensors whose shape the
        front end knows; ``fresh`` hands out unused tensor names (for partial sums); ``describe``
    names the readers of a tensor that are not nodes of this graph (for report lines);
    ``pad_layer``: the front end writes a conv with asymmetric padding as a pad layer and a conv
    (torch convs pad symmetrically), so such a merge must replace more than two layers;
    ``ring_nodes``: the front end writes a case-2 border ring as graph nodes (ONNX: an Add, and
    the run-time form's shape plumbing and convs), not inside the merged layer (torch).
    """

    nodes: list[LinearNode]
    external: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    shapes: dict[str, Sequence[int | None]] = field(default_factory=dict)
    fresh: Callable[[str], str] | None = None
    describe: Callable[[str], str] | None = None
    pad_layer: bool = False
    ring_nodes: bool = False

    def __post_init__(self) -> None:
        self.producer: dict[str, LinearNode] = {n.output: n for n in self.nodes}
        self.consumers: dict[str, list[LinearNode]] = {}
        self.order: dict[int, int] = {id(n): i for i, n in enumerate(self.nodes)}
        readers: dict[Hashable, int] = {}
        for node in self.nodes:
            for name in dict.fromkeys(node.inputs):
                self.consumers.setdefault(name, []).append(node)
            for key in node.weights:
                readers[key] = readers.get(key, 0) + 1
        self.weight_readers = readers
        self._taken = {n.output for n in self.nodes} | {i for n in self.nodes for i in n.inputs}

    def new_name(self, base: str) -> str:
        """A tensor name no node uses."""
        if self.fresh is not None:
            return self.fresh(base)
        name, k = base, 1
        while name in self._taken:
            name, k = f"{base}_{k}", k + 1
        self._taken.add(name)
        return name


def regroups(before: Sequence[int | None] | None, after: Sequence[int | None] | None) -> bool:
    """Whether a reshape from ``before`` to ``after`` keeps the last dim and only regroups (or
    adds, or drops) the dims before it: ``flatten(0, 1)`` of ``[B, N, C]``, ``reshape_as`` back,
    a unit dim squeezed or unsqueezed before the last. Row-major order maps index ``(i, c)`` to
    ``(j, c)`` whenever the last sizes agree, so the last coordinate is untouched. Both shapes
    must be known to rank 2 or more and their last sizes known and equal."""
    if before is None or after is None or len(before) < 2 or len(after) < 2:
        return False
    return before[-1] is not None and before[-1] == after[-1]
