"""One planner for both front ends: find linear regions, say which become one conv (DESIGN.md 5).

Input: a :class:`~convfuse.ir.LinearGraph` (the linear nodes of one graph, built by a front
end's importer). Output: a :class:`Plan` of :class:`Merge` values (these nodes become one conv
from ``x`` to ``y``), :class:`Resum` values (a sum left with fewer terms) and declines with
their reasons. The front end's exporter writes the plan back. No graph types here.

**Regions.** From each node not yet planned (latest first), a region grows backwards over
nodes whose output is read only inside it and is not external, until no more can join. A
region with one input tensor ``x`` is planned; one with several inputs is a sum of terms from
different tensors (each tensor's terms are planned as a sum of their own, the rest stays
summed) or is cut at the node where its inputs meet. Refused nodes end regions.

**Plan of a region** (series-parallel). The tensors every path from ``x`` to the output goes
through cut the region into a series of segments; a segment is one node or a parallel block
(branches of the segment's input combined by a SUM or CONCAT node), each branch a region of
its own. Every tensor is a linear map of ``x`` (a ConvSpec, a ConvTransposeSpec where a
transposed conv is in the way, a BorderMap for padding case 2): ``compose`` along a series,
``add`` of ``scaled`` branches for a sum, ``concat`` for a concatenation, all through the rule
table of :mod:`convfuse.maps` (the planner never calls the algebra itself; a map's costs are
the map type's own). Dynamic programming over the series picks the groups of consecutive segments
that collapse to one conv (exact and allowed by the policy), a parallel block also trying to
keep its sum with its branches planned alone, or with only some branches merged. Costs are
MACs per output position of the region (earlier layers scaled by the strides after them) and
the parameters a merge removes: a parameter also read outside the merge stays in the model,
so a shared layer is not copied into each path under ``flops``. The key is MACs, parameters,
layers under ``flops``; layers first under ``always`` and ``latency`` (every merge allowed
there measured no slower). Each candidate is judged on its predicted shape
(:mod:`convfuse.estimate`) before its weights are computed.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import numpy as np

from . import maps
from .algebra import Cost
from .border_map import (
    BorderMap,
    Correction,
    correction_options,
)
from .decline import Decline, Reason
from .ir import REGROUP, LinearGraph, LinearNode, OpKind, TensorInfo
from .maps import Map, add, compose, concat, identity, scaled
from .policy import Judge, Policy
from .report import MergeKind
from .spec import ConvSpec
from .timing import Block, Candidate, Parallel, Timing
from .transpose import ConvTransposeSpec

__all__ = ["MAX_CHAIN", "Merge", "Resum", "Plan", "plan"]

#: Most consecutive segments (layers or parallel blocks) one merge folds.
MAX_CHAIN = 12


@dataclass(frozen=True, eq=False)
class Merge:
    """``nodes`` become one conv ``spec`` (float64) reading ``x`` and writing ``y``."""

    kind: str  # detail: the op tags of a chain joined by "+" ("bn+conv"), "sum", "concat", "sum+chain"
    nodes: tuple[LinearNode, ...]
    x: str
    y: str
    spec: ConvSpec | ConvTransposeSpec
    before: Cost
    after: Cost
    note: str = ""
    timing: Timing | None = None
    linear: bool = False  # a Linear layer on the last dim: ``spec`` is 1D pointwise [Co, Ci, 1]
    ring: Correction | None = None  # case 2: ``y = spec(x) + ring`` (convfuse.border_map)

    @property
    def group(self) -> MergeKind:
        """The report's kind of this merge."""
        return MergeKind.of(self.kind)

    @property
    def sources(self) -> tuple[str, ...]:
        """The layers merged (the sums and concatenations combining them are not layers)."""
        return tuple(n.name for n in self.nodes if n.kind.is_unary)


@dataclass(frozen=True, eq=False)
class Resum:
    """The SUM ``nodes`` become ``y = sum_i c_i * t_i`` over ``terms`` (``(t_i, c_i)``)."""

    nodes: tuple[LinearNode, ...]
    terms: tuple[tuple[str, float], ...]
    y: str


@dataclass
class Plan:
    """What to write back, and every place left as it is with its reason."""

    merges: list[Merge] = field(default_factory=list)
    resums: list[Resum] = field(default_factory=list)
    declines: list[tuple[tuple[str, ...], Decline]] = field(default_factory=list)
    fresh: set[str] = field(default_factory=set)  # tensors the plan introduces (partial sums)

    def groups(self) -> list[tuple[list[Merge], Resum | None]]:
        """Rewrites that stand or fall together: a rebuilt sum with the merges writing its new
        terms; every other merge alone."""
        owned: dict[str, int] = {}
        for k, r in enumerate(self.resums):
            for t, _ in r.terms:
                if t in self.fresh:
                    owned[t] = k
        out: list[tuple[list[Merge], Resum | None]] = [([], r) for r in self.resums]
        for m in self.merges:
            if m.y in owned:
                out[owned[m.y]][0].append(m)
            else:
                out.append(([m], None))
        return out


def plan(graph: LinearGraph, policy: Policy | str | Judge = Policy.FLOPS, dtype: Any = None) -> Plan:
    """Plan every linear region of ``graph`` under ``policy`` (``dtype``: the model's, for timing)."""
    return _Planner(graph, Judge.of(policy), dtype).run()


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class _Option:
    """One way to write a part of a region: its cost, layer count, rewrites and declines."""

    macs: float
    params: int
    layers: int
    merges: tuple[Merge, ...] = ()
    resums: tuple[Resum, ...] = ()
    declines: tuple[tuple[tuple[str, ...], Decline], ...] = ()

    def __add__(self, other: _Option) -> _Option:
        return _Option(
            self.macs + other.macs,
            self.params + other.params,
            self.layers + other.layers,
            self.merges + other.merges,
            self.resums + other.resums,
            self.declines + other.declines,
        )

    def key(self, layers_first: bool) -> tuple[float, ...]:
        macs = round(self.macs, 6)
        return (self.layers, macs, self.params) if layers_first else (macs, self.params, self.layers)


_NONE = _Option(0.0, 0, 0)
_FREE = Cost(0, 0)  # no border correction


class _Retry(Exception):
    """The region must be cut: ``tensors`` become materialized, ``barrier`` nodes refused."""

    def __init__(self, tensors: Iterable[str] = (), barrier: LinearNode | None = None) -> None:
        super().__init__()
        self.tensors = set(tensors)
        self.barrier = barrier


# --------------------------------------------------------------------------- the planner
class _Planner:
    def __init__(self, graph: LinearGraph, judge: Judge, dtype: Any) -> None:
        self.g = graph
        self.judge = judge
        self.dtype = dtype
        self.layers_first = judge.policy in (Policy.ALWAYS, Policy.LATENCY)
        self.materialized = set(graph.external)
        self.barrier: set[int] = {id(n) for n in graph.nodes if n.refused is not None}
        self.claimed: set[int] = set()
        self.out = Plan()
        self.reported: set[tuple[Any, ...]] = set()

    # ------------------------------------------------------------------ driver
    def run(self) -> Plan:
        self._report_refused()
        for root in reversed(self.g.nodes):
            if id(root) in self.claimed or id(root) in self.barrier:
                continue
            for _ in range(4 * len(self.g.nodes) + 4):
                try:
                    self._root(root)
                    break
                except _Retry as retry:
                    self.materialized |= retry.tensors
                    if retry.barrier is not None:
                        self.barrier.add(id(retry.barrier))
                        if retry.barrier is root:
                            break
        self.out.merges.sort(key=lambda m: max(self.g.order.get(id(n), 0) for n in m.nodes))  # graph order
        return self.out

    def _decline(self, sources: Sequence[str], decline: Decline) -> None:
        key = (tuple(sources), decline.reason, decline.message)
        if key not in self.reported:
            self.reported.add(key)
            self.out.declines.append((tuple(sources), decline))

    def _report_refused(self) -> None:
        """A refused node next to a usable linear node: say why the run stops there."""
        for node in self.g.nodes:
            if node.refused is None:
                continue
            around = [self.g.producer.get(i) for i in node.inputs] + self.g.consumers.get(node.output, [])
            near = [n for n in around if n is not None and n.refused is None]
            if near or node.kind.is_anchor:
                self._decline([n.name for n in [*near[:1], node, *near[1:]]], node.refused)

    def _usable(self, node: LinearNode | None) -> bool:
        return node is not None and id(node) not in self.barrier and id(node) not in self.claimed

    # ------------------------------------------------------------------ regions
    def _grow(self, root: LinearNode) -> tuple[list[LinearNode], list[str]]:
        """The region ending at ``root``: its nodes (topological order) and input tensors."""
        region = {id(root): root}
        while True:
            frontier = self._frontier(region)
            best: LinearNode | None = None
            for t in frontier:
                p = self.g.producer.get(t)
                if not self._usable(p) or t in self.materialized:
                    continue
                if any(id(c) not in region for c in self.g.consumers.get(t, [])):
                    continue
                if best is None or self.g.order[id(p)] > self.g.order[id(best)]:
                    best = p
            if best is None:
                break
            region[id(best)] = best
        nodes = sorted(region.values(), key=lambda n: self.g.order[id(n)])
        return nodes, self._frontier(region)

    def _frontier(self, region: dict[int, LinearNode]) -> list[str]:
        produced = {n.output for n in region.values()}
        out: dict[str, None] = {}
        for n in sorted(region.values(), key=lambda n: self.g.order.get(id(n), 1 << 30)):
            for t in n.inputs:
                if t not in produced:
                    out[t] = None
        return list(out)

    def _root(self, root: LinearNode) -> None:
        nodes, inputs = self._grow(root)
        if len(inputs) == 1:
            self._region(inputs[0], root.output, nodes)
            self.claimed |= {id(n) for n in nodes}
        else:  # claims the sum and the terms it planned; a lone term is planned from its own root
            self._mixed(root, nodes, inputs)
        for x in inputs:
            self._report_boundaries(nodes, x)

    def _report_boundaries(self, nodes: list[LinearNode], x: str) -> None:
        """The region stopped at ``x``: a graph output, or a tensor other nodes read too."""
        p = self.g.producer.get(x)
        if p is None or p.refused is not None or id(p) in self.barrier:
            return
        readers = [n for n in nodes if x in n.inputs]
        if not readers or not (p.kind.is_anchor or any(n.kind.is_anchor for n in nodes)):
            return
        others = [n.name for n in self.g.consumers.get(x, []) if n not in readers]
        if x in self.g.outputs:
            reason = Reason.GRAPH_OUTPUT
        elif others or x in self.g.external:
            reason = Reason.SHARED_TENSOR
        else:
            return
        users = self.g.describe(x) if self.g.describe is not None else ""
        users = ", ".join([*others, users] if users else others) or "the graph output"
        self._decline(
            [p.name],
            Decline(reason, f"the output of {p.name} is also used by {users}, so it must stay computed"),
        )

    def _sources(self, nodes: list[LinearNode], inputs: list[str]) -> dict[str, frozenset[str]]:
        src: dict[str, frozenset[str]] = {t: frozenset([t]) for t in inputs}
        for n in nodes:
            src[n.output] = frozenset().union(*(src[i] for i in n.inputs))
        return src

    def _mixed(self, root: LinearNode, nodes: list[LinearNode], inputs: list[str]) -> None:
        """A region reading several tensors: plan the terms of each tensor of a sum together."""
        src = self._sources(nodes, inputs)
        inside = {id(n): n for n in nodes}
        # A tensor of several inputs read by a layer (or a concat) is no map of one input: it
        # stays computed, and the regions around it are planned apart.
        readers: dict[str, list[LinearNode]] = {}
        for n in nodes:
            for t in n.inputs:
                readers.setdefault(t, []).append(n)
        mixed: set[str] = set()
        for n in nodes:
            if len({src[i] for i in n.inputs}) < 2:
                continue  # not where inputs meet
            if n.kind is OpKind.CONCAT:
                mixed |= {n.output, *n.inputs}
            elif n is not root and any(r.kind is not OpKind.SUM for r in readers.get(n.output, [])):
                mixed.add(n.output)
        if mixed:
            raise _Retry(tensors=mixed)
        if root.kind is not OpKind.SUM:
            raise _Retry(tensors=root.inputs)
        tree: list[LinearNode] = []
        terms: list[tuple[str, float]] = []

        def flat(t: str, c: float) -> None:
            p = self.g.producer.get(t)
            if p is not None and id(p) in inside and p.kind is OpKind.SUM and len(src[t]) > 1:
                tree.append(p)
                for inp, k in zip(p.inputs, p.coefs):
                    flat(inp, c * k)
            else:
                terms.append((t, c))

        tree.append(root)
        for inp, k in zip(root.inputs, root.coefs):
            flat(inp, k)
        multi = [t for t, _ in terms if len(src[t]) > 1]
        if multi:
            raise _Retry(tensors=multi)
        groups: dict[frozenset[str], list[int]] = {}
        for i, (t, _) in enumerate(terms):
            groups.setdefault(src[t], []).append(i)
        tree_ids = {id(n) for n in tree}
        new_terms: dict[int, list[tuple[str, float]]] = {}  # first term index -> replacement
        dropped: set[int] = set()
        claimed: set[int] = set(tree_ids)
        for members in groups.values():
            if len(members) < 2:
                continue
            (x,) = src[terms[members[0]][0]]
            group_terms = [terms[i] for i in members]
            body = self._ancestors([t for t, _ in group_terms], inside, tree_ids)
            y = self.g.new_name(f"{root.output}/{x}")
            self.out.fresh.add(y)
            virtual = LinearNode(
                root.name,
                OpKind.SUM,
                tuple(t for t, _ in group_terms),
                y,
                coefs=tuple(c for _, c in group_terms),
            )
            self.g.order[id(virtual)] = self.g.order[id(root)]
            result = self._region(x, y, body + [virtual], write=False)
            claimed |= {id(n) for n in body}
            if result is None:
                continue
            merges = [replace(m, nodes=tuple(n for n in m.nodes if n is not virtual)) for m in result[0]]
            resums = result[1]
            self.out.merges.extend(merges)
            self.out.resums.extend(r for r in resums if r.y != y)
            whole = [m for m in merges if m.y == y]
            if whole:
                replacement = [(y, 1.0)]
            else:
                mine = [r for r in resums if r.y == y]
                replacement = list(mine[0].terms) if mine else group_terms
            if replacement != group_terms:
                new_terms[members[0]] = replacement
                dropped |= set(members[1:])
        self.claimed |= claimed
        if new_terms:
            out_terms: list[tuple[str, float]] = []
            for i, term in enumerate(terms):
                if i in new_terms:
                    out_terms += new_terms[i]
                elif i not in dropped:
                    out_terms.append(term)
            self.out.resums.append(Resum(tuple(tree), tuple(out_terms), root.output))

    def _ancestors(
        self, tensors: Sequence[str], inside: dict[int, LinearNode], stop: set[int]
    ) -> list[LinearNode]:
        found: dict[int, LinearNode] = {}
        todo = list(tensors)
        while todo:
            p = self.g.producer.get(todo.pop())
            if p is None or id(p) not in inside or id(p) in stop or id(p) in found:
                continue
            found[id(p)] = p
            todo += list(p.inputs)
        return sorted(found.values(), key=lambda n: self.g.order[id(n)])

    # ------------------------------------------------------------------ one region
    def _region(
        self, x: str, y: str, nodes: list[LinearNode], write: bool = True
    ) -> tuple[list[Merge], list[Resum]] | None:
        """Plan the single-input region ``x -> y``; write its rewrites (or return them)."""
        if not any(n.kind.is_anchor for n in nodes):
            return None
        features = any(n.layout == "last" for n in nodes)
        info = self._features_info(x, nodes) if features else self._input_info(x, nodes)
        if isinstance(info, Decline):
            return None  # no layer says what the input is (a pool alone): nothing to do
        region = _Region(self, x, y, nodes, info, features)
        best = region.best(x, y, tuple(nodes))
        for sources, decline in best.declines:
            self._decline(sources, decline)
        if write:
            self.out.merges.extend(best.merges)
            self.out.resums.extend(best.resums)
            return None
        return list(best.merges), list(best.resums)

    def _input_info(self, x: str, nodes: list[LinearNode]) -> TensorInfo | Decline:
        """Channels and rank of ``x``: its known shape, else what the nodes reading it fix.

        A reshape that regroups the dims before the last (``REGROUP``) is the identity only on
        a Linear layer's features: among convolutions it moves the channels (a channel shuffle's
        ``[N, C, H, W] -> [N, g, C/g, H, W]``), so it ends the region there like a non-linear op
        (each side planned on its own)."""
        cut = {t for n in nodes if n.layout == REGROUP for t in (*n.inputs, n.output)}
        if not cut <= self.materialized:
            raise _Retry(tensors=cut)
        shape = self.g.shapes.get(x)
        ndims = {n.ndim for n in nodes if n.ndim is not None}
        if shape is not None and len(shape) >= 3 and shape[1] is not None:
            spatial = tuple(shape[2:])
            if not ndims or ndims == {len(spatial)}:
                return TensorInfo(int(shape[1]), len(spatial), shape[0], spatial)
        if len(ndims) > 1:
            return Decline(Reason.RANK_MISMATCH, f"the region mixes {sorted(ndims)}D layers")
        channels = self._channels(x, nodes)
        if channels is None or not ndims:
            return Decline(
                Reason.UNSUPPORTED, f"cannot tell the channels and rank of {x!r} from the layers reading it"
            )
        return TensorInfo(channels, ndims.pop())

    def _features_info(self, x: str, nodes: list[LinearNode]) -> TensorInfo | Decline:
        """A region of Linear layers: every map acts on the last dim (a 1D pointwise conv on a
        virtual length-1 grid). Layers that read channels at dim 1 join only on known rank-2
        tensors, where dim 1 is the last; convolutions, pads and pools never do."""
        bad: list[tuple[LinearNode, Decline]] = []
        for n in nodes:
            if n.kind in (OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.PAD, OpKind.POOL):
                bad.append(
                    (
                        n,
                        Decline(
                            Reason.RANK_MISMATCH,
                            f"{n.name} works on spatial dims, a Linear layer on the last dim",
                        ),
                    )
                )
                continue
            needs_rank2 = n.layout == "first" or n.kind is OpKind.CONCAT
            if needs_rank2 and any(len(self.g.shapes.get(i) or ()) != 2 for i in n.inputs):
                bad.append((n, Decline(
                    Reason.RANK_MISMATCH,
                    f"{n.name} reads channels at dim 1 and a Linear layer reads the last dim; "
                    "they agree only on a [N, C] tensor, and this input's rank is not known to be 2 "
                    "(pass example inputs)",
                )))  # fmt: skip
        if bad:  # cut the region where the layout changes: each side is planned on its own
            cut = {i for n in nodes if n.layout == "last" for i in n.inputs}
            cut |= {t for n, _ in bad for t in (*n.inputs, n.output)}
            for n, decline in bad:
                self._decline([n.name, *(m.name for m in nodes if m.layout == "last")], decline)
            if not cut <= self.materialized:
                raise _Retry(tensors=cut)
            return bad[0][1]
        channels = self._channels(x, nodes)
        if channels is None:
            return Decline(
                Reason.UNSUPPORTED, f"cannot tell the features of {x!r} from the layers reading it"
            )
        return TensorInfo(channels, 1)

    def _channels(self, x: str, nodes: list[LinearNode]) -> int | None:
        """The input channels of the first node on a channel-preserving path from ``x`` that fixes them."""
        inside = {id(n) for n in nodes}
        todo, seen = [x], set()
        while todo:
            t = todo.pop(0)
            if t in seen:
                continue
            seen.add(t)
            for n in self.g.consumers.get(t, []):
                if id(n) not in inside:
                    continue
                if n.in_channels is not None:
                    return n.in_channels
                if n.kind.is_affine or n.kind in (OpKind.PAD, OpKind.POOL, OpKind.IDENTITY, OpKind.SUM):
                    todo.append(n.output)
        return None


class _Region:
    """The maps, costs and options of one single-input region (memoized per sub-region)."""

    def __init__(
        self,
        planner: _Planner,
        x: str,
        y: str,
        nodes: list[LinearNode],
        info: TensorInfo,
        features: bool = False,
    ) -> None:
        self.p = planner
        self.features = features
        self.g = planner.g
        self.x = x
        self.nodes = nodes
        self.ids = {id(n) for n in nodes}
        self.producer = {n.output: n for n in nodes}
        self.info: dict[str, TensorInfo] = {x: info}
        self.spec: dict[int, ConvSpec | ConvTransposeSpec] = {}
        for n in nodes:
            self._build(n)
        self.factor = self._factors(y)
        self._maps: dict[tuple[str, str, tuple[int, ...]], Map | Decline] = {}
        self._best: dict[tuple[str, str, tuple[int, ...]], _Option] = {}

    # ------------------------------------------------------------------ building
    def _build(self, n: LinearNode) -> None:
        ins = [self.info[i] for i in n.inputs]
        if n.kind.is_unary:
            assert n.build is not None
            try:
                spec = n.build(ins[0])
            except Exception as exc:  # noqa: BLE001 - a reader that cannot describe the op here
                spec = Decline(Reason.UNSUPPORTED, f"{n.name}: {exc}")
            if isinstance(spec, Decline):
                self._refuse(n, spec)
            self.spec[id(n)] = spec
            self.info[n.output] = ins[0].after(spec)
            return
        if len({i.ndim for i in ins}) != 1:
            self._refuse(n, Decline(Reason.RANK_MISMATCH, f"{n.name} combines tensors of different ranks"))
        if n.kind is OpKind.SUM:
            if len({i.channels for i in ins}) != 1:
                self._refuse(
                    n,
                    Decline(
                        Reason.CHANNEL_MISMATCH,
                        f"{n.name} sums {sorted({i.channels for i in ins})} channels (broadcast)",
                    ),
                )
            self.info[n.output] = ins[0]
        else:
            self.info[n.output] = TensorInfo(
                sum(i.channels for i in ins), ins[0].ndim, ins[0].batch, ins[0].spatial
            )

    def _refuse(self, n: LinearNode, decline: Decline) -> NoReturn:
        near = [self.producer[i].name for i in n.inputs if i in self.producer]
        self.p._decline([*near, n.name], decline)
        raise _Retry(tensors=[*n.inputs, n.output], barrier=n)

    def _factors(self, y: str) -> dict[str, float]:
        """Positions of each tensor per output position of the region (product of later strides)."""
        f: dict[str, float] = {y: 1}
        for n in reversed(self.nodes):
            if n.output not in f:
                f[n.output] = 1
            s = maps.input_positions(self.spec[id(n)]) if n.kind.is_unary else 1
            for i in n.inputs:
                f.setdefault(i, f[n.output] * s)
        return f

    # ------------------------------------------------------------------ costs
    def node_cost(self, n: LinearNode) -> float:
        if not n.kind.is_unary or n.kind in (OpKind.PAD, OpKind.IDENTITY):
            return 0.0
        return maps.macs(self.spec[id(n)]) * self.factor.get(n.output, 1)

    def before(self, nodes: Sequence[LinearNode], stored: bool = False) -> tuple[float, int]:
        """MACs of ``nodes`` and the parameters removing them removes (those no other node reads).

        Decisions count a per-channel affine as the scale and shift it applies (``C`` each when
        not neutral), whatever the front end stores (ONNX keeps a BatchNorm's four vectors, torch
        two parameters and two buffers), so both front ends plan alike; ``stored`` counts what
        the model holds, for the report (with a shift counted at least as the bias it becomes)."""
        counts: dict[Hashable, int] = {}
        sizes: dict[Hashable, int] = {}
        for n in nodes:
            if n.kind.is_affine and not stored:
                continue
            for key, size in n.weights.items():
                counts[key] = counts.get(key, 0) + 1
                sizes[key] = size
        params = sum(sizes[k] for k, c in counts.items() if c == self.g.weight_readers.get(k, c))
        affines = [n for n in nodes if n.kind.is_affine]
        params += sum(self._constant_floor(n) if stored else self._affine_params(n) for n in affines)
        return sum(self.node_cost(n) for n in nodes), params

    def _affine_params(self, n: LinearNode) -> int:
        spec = self.spec[id(n)]
        scale = spec.out_channels if not bool((spec.weight == 1).all()) else 0
        return scale + (spec.out_channels if spec.has_nonzero_bias() else 0)

    def _constant_floor(self, n: LinearNode) -> int:
        """A per-channel shift becomes the merged conv's bias however it is stored (a buffer, a
        scalar): it counts at least as that bias (a scale folds into the weight for free)."""
        spec = self.spec[id(n)]
        floor = spec.out_channels if spec.has_nonzero_bias() else 0
        return max(0, floor - sum(n.weights.values()))

    def kept(self, nodes: Sequence[LinearNode]) -> _Option:
        macs, params = self.before(nodes)
        return _Option(macs, params, len(nodes))

    # ------------------------------------------------------------------ structure
    def _series(self, x: str, nodes: tuple[LinearNode, ...]) -> list[tuple[str, tuple[LinearNode, ...]]]:
        """``nodes`` (a region from ``x``) cut at the tensors every path goes through:
        ``(segment input, segment nodes)`` in order."""
        index = {n.output: k for k, n in enumerate(nodes)}
        first_read = [min((index.get(i, -1) for i in n.inputs), default=-1) for n in nodes]
        segments = []
        start, seg_in = 0, x
        suffix = len(nodes)
        mins = [0] * (len(nodes) + 1)
        mins[len(nodes)] = suffix
        for k in range(len(nodes) - 1, -1, -1):
            mins[k] = min(mins[k + 1], first_read[k])
        for k in range(len(nodes)):
            if k == len(nodes) - 1 or mins[k + 1] >= k:
                segments.append((seg_in, nodes[start : k + 1]))
                start, seg_in = k + 1, nodes[k].output
        return segments

    def _branches(self, a: str, seg: tuple[LinearNode, ...]) -> tuple[list[_Branch], tuple[LinearNode, ...]]:
        """The branches of a parallel segment and the SUM/CONCAT nodes combining them: nested
        sums read only by a sum are one sum (``(a + b) + c`` has three terms)."""
        last = seg[-1]
        inside = {n.output: n for n in seg[:-1]}
        tree = [last]
        terms: list[tuple[str, float]] = []

        def flat(t: str, c: float) -> None:
            p = inside.get(t)
            if (
                last.kind is OpKind.SUM
                and p is not None
                and p.kind is OpKind.SUM
                and len(self.g.consumers.get(t, [])) == 1
            ):
                tree.append(p)
                for inp, k in zip(p.inputs, p.coefs):
                    flat(inp, c * k)
            else:
                terms.append((t, c))

        for inp, k in zip(last.inputs, last.coefs or (1.0,) * len(last.inputs)):
            flat(inp, k)
        tree_ids = {id(n) for n in tree}
        owner: dict[int, int] = {}
        out = []
        for k, (t, c) in enumerate(terms):
            found: dict[int, LinearNode] = {}
            todo = [t]
            while todo:
                n = inside.get(todo.pop())
                if n is None or id(n) in found or id(n) in tree_ids:
                    continue
                found[id(n)] = n
                todo += list(n.inputs)
            for i in found:
                owner.setdefault(i, k)
            out.append(_Branch(t, c, tuple(sorted(found.values(), key=lambda n: self.g.order[id(n)]))))
        return out, tuple(sorted(tree, key=lambda n: self.g.order[id(n)]))

    def _overlap(self, branches: list[_Branch]) -> bool:
        """Whether some node feeds two branches (a layer whose output two branches read): each
        branch is still a map of the input, but the branches cannot be written apart."""
        seen: set[int] = set()
        for br in branches:
            ids = {id(n) for n in br.nodes}
            if ids & seen:
                return True
            seen |= ids
        return False

    # ------------------------------------------------------------------ maps
    def map(self, x: str, y: str, nodes: tuple[LinearNode, ...]) -> Map | Decline:
        """``y`` as one conv of ``x`` (``nodes``: the sub-region between them)."""
        key = (x, y, tuple(id(n) for n in nodes))
        if key not in self._maps:
            self._maps[key] = self._compute_map(x, y, nodes)
        return self._maps[key]

    def _compute_map(self, x: str, y: str, nodes: tuple[LinearNode, ...]) -> Map | Decline:
        if not nodes:  # the input itself, in the precision the layers were built in (float64)
            dtype = next(spec.dtype for spec in self.spec.values())
            return identity(self.info[x].channels, self.info[x].ndim, dtype=dtype)
        acc: Map | None = None
        for seg_in, seg in self._series(x, nodes):
            m = self.segment_map(seg_in, seg)
            if isinstance(m, Decline):
                return m
            step = m if acc is None else compose(acc, m)
            if isinstance(step, Decline):
                return step
            acc = step
        assert acc is not None
        return acc

    def segment_map(self, a: str, seg: tuple[LinearNode, ...]) -> Map | Decline:
        last = seg[-1]
        if last.kind.is_unary:
            return self.spec[id(last)]
        parts = []
        for br in self._branches(a, seg)[0]:
            m = self.map(a, br.tensor, br.nodes)
            if isinstance(m, Decline):
                return m
            if last.kind is OpKind.SUM:
                m = scaled(m, br.coef)
                if isinstance(m, Decline):
                    return m
            parts.append(m)
        return add(parts) if last.kind is OpKind.SUM else concat(parts)

    # ------------------------------------------------------------------ policy
    def decide(
        self,
        nodes: Sequence[LinearNode],
        merged: Map,
        x: str,
        y: str,
        block: Block | None,
        extra: Cost = _FREE,
    ):
        """The policy's decision on one merge (``extra``: a border correction's cost per output
        position of ``y``, added to the merged conv's)."""
        macs, params = self.before(nodes)
        before = Cost(int(round(macs)), params)
        after = Cost(
            int(round((maps.macs(merged) + extra.macs) * self.factor.get(y, 1))),
            maps.params(merged) + extra.params,
        )
        candidate = None
        if self.p.judge.times and block is not None and not self.features and maps.timed(merged):
            candidate = Candidate(block, merged, self.info[x].shape, self.p.dtype or _default_dtype())
        stored = Cost(before.macs, self.before(nodes, stored=True)[1])
        return self.p.judge.decide(before, after, candidate), stored, after

    def block(self, a: str, seg: tuple[LinearNode, ...]) -> Block | None:
        """The layers of a segment as a timing model reads them (None: not expressible)."""
        last = seg[-1]
        if last.kind.is_unary:
            spec = self.spec[id(last)]
            if last.kind is OpKind.IDENTITY:
                return ()
            return (spec,) if maps.timed(spec) else None  # the timing model reads what it can time
        if last.kind is OpKind.CONCAT:
            return None
        found = self._branches(a, seg)[0]
        if self._overlap(found):
            return None
        blocks = []
        for br in found:
            b = self.series_block(a, br.nodes)
            if b is None:
                return None
            blocks.append(b)
        return (Parallel(tuple(blocks)),)

    def series_block(self, x: str, nodes: tuple[LinearNode, ...]) -> Block | None:
        out: list[Any] = []
        for seg_in, seg in self._series(x, nodes) if nodes else []:
            b = self.block(seg_in, seg)
            if b is None:
                return None
            out += list(b)
        return tuple(out)

    # ------------------------------------------------------------------ merges
    def merge(
        self,
        nodes: tuple[LinearNode, ...],
        x: str,
        y: str,
        spec: Map,
        block: Block | None,
        adds: int = 0,
    ) -> _Option | Decline:
        """One conv for ``nodes`` (and ``adds`` terms of a sum) if the policy allows it; else why not.

        A :class:`~convfuse.border_map.BorderMap` (case 2) is one conv plus its ring: the first
        form of :func:`~convfuse.border_map.correction_options` the policy allows, its cost added."""
        if not any(n.kind.is_anchor for n in nodes):
            return Decline(Reason.NOTHING_TO_MERGE, "no convolution among these layers")
        options: list[Correction | None] = [None]
        if isinstance(spec, BorderMap):
            found = correction_options(spec, self.info[x].spatial, self.g.ring_nodes)
            if isinstance(found, Decline):
                return found
            options = list(found)
            spec = spec.spec
        spec = maps.without_zero_bias(spec)
        problem = maps.unwritable(spec, self.g.pad_layer)
        if problem is not None:
            return problem
        written = maps.layers_written(spec, self.g.pad_layer)
        pads = sum(1 for n in nodes if n.kind is OpKind.PAD)
        if len(nodes) + adds - pads <= 1 and len(nodes) + adds <= written:
            return Decline(Reason.NOTHING_TO_MERGE, "the merged conv would be written as as many layers")
        refused: Decline | None = None
        for ring in options:
            extra = ring.cost if ring is not None else _FREE
            grows = ring is not None and self.g.ring_nodes and written + ring.nodes > len(nodes) + adds
            if ring is not None and grows and not self.p.layers_first:  # flops: never grow the graph
                refused = refused or Decline(
                    Reason.PADDED_AFTER_BIASED_POINTWISE,
                    f"padding case 2: exact only with a border correction, whose {ring.form} form adds "
                    f"{ring.nodes} nodes where the merge removes {len(nodes) + adds - written}",
                )
                continue
            decision, before, after = self.decide(nodes, spec, x, y, block, extra)
            if decision.decline is not None:
                refused = refused or decision.decline
                continue
            note = "; ".join(s for s in (self.note(nodes, ring), decision.note) if s)
            merge = Merge(
                _kind(nodes), nodes, x, y, spec, before, after, note, decision.timing, self.features, ring
            )
            return _Option(after.macs, after.params, written, (merge,))  # a ring's Add is no layer
        assert refused is not None
        if options[0] is not None and refused.reason is Reason.NOT_PROFITABLE:  # still case 2 in the report
            return Decline(
                Reason.PADDED_AFTER_BIASED_POINTWISE,
                "padding case 2: exact only with a border correction, which does not pay here: "
                f"{refused.message}",
            )
        return refused

    def note(self, nodes: Sequence[LinearNode], ring: Correction | None = None) -> str:
        notes = [] if ring is None else [ring.note]
        if any(n.kind is OpKind.PAD for n in nodes):
            notes.append("zero Pad folded into the conv padding")
        produced = {n.output: n for n in nodes}
        for n in nodes:
            spec = self.spec[id(n)] if n.kind.is_unary else None
            if not isinstance(spec, ConvSpec) or n.kind is OpKind.PAD or not spec.is_padded:
                continue
            before = []
            todo = list(n.inputs)
            while todo:
                p = produced.get(todo.pop())
                if p is not None:
                    before.append(p)
                    todo += list(p.inputs)
            if (
                before
                and ring is None
                and all(p.kind.is_unary and _plain_pointwise(self.spec[id(p)]) for p in before)
                and any(p.kind is not OpKind.PAD for p in before)
            ):
                notes.append(
                    f"padding case 1: the layers before {n.name} are pointwise with zero bias, so its zero "
                    "padding moves to the input"
                )
        return "; ".join(notes)

    # ------------------------------------------------------------------ best options
    def best(self, x: str, y: str, nodes: tuple[LinearNode, ...]) -> _Option:
        key = (x, y, tuple(id(n) for n in nodes))
        if key not in self._best:
            self._best[key] = self._compute_best(x, y, nodes)
        return self._best[key]

    def _pick(self, options: Iterable[_Option]) -> _Option:
        return min(options, key=lambda o: o.key(self.p.layers_first))

    def _compute_best(self, x: str, y: str, nodes: tuple[LinearNode, ...]) -> _Option:
        if not nodes:
            return _NONE
        segments = self._series(x, nodes)
        outs = [seg[-1].output for _, seg in segments]
        k = len(segments)
        single = [self.segment_best(a, seg) for a, seg in segments]
        # results[(i, j)]: collapsing segments i..j-1 into one conv (an option or why not)
        results: dict[tuple[int, int], _Option | Decline] = {}
        for i in range(k):
            acc: Map | Decline  # set at j == i + 1, before any read
            geo: Map | None = None
            pending: list[Map] = []
            nodes_ij: tuple[LinearNode, ...] = ()
            for j in range(i + 1, min(k, i + MAX_CHAIN) + 1):
                a, seg = segments[j - 1]
                m = self.segment_map(a, seg)
                if isinstance(m, Decline):
                    if j > i + 1:
                        results[(i, j)] = m
                    break
                nodes_ij = nodes_ij + seg
                if j == i + 1:
                    acc, geo = m, m
                    continue
                geo = maps.predicted(geo, m) if geo is not None else None
                pending.append(m)
                if not any(n.kind.is_anchor for n in nodes_ij):
                    continue
                x_i = segments[i][0]
                block = self._run_block(segments[i:j])
                if geo is not None:
                    refused, _, _ = self.decide(nodes_ij, geo, x_i, outs[j - 1], block)
                    if refused.decline is not None:
                        results[(i, j)] = refused.decline
                        continue
                for step in pending:
                    acc = compose(acc, step)  # type: ignore[arg-type]
                    if isinstance(acc, Decline):
                        break
                pending = []
                if isinstance(acc, Decline):
                    results[(i, j)] = acc
                    break
                results[(i, j)] = self.merge(nodes_ij, x_i, outs[j - 1], acc, block)
        best: list[_Option | None] = [None] * (k + 1)
        best[0] = _NONE
        cut_from: list[int] = [-1] * (k + 1)
        for j in range(1, k + 1):
            for i in range(max(0, j - MAX_CHAIN), j):
                start, current = best[i], best[j]
                if start is None:
                    continue
                part = single[i] if j == i + 1 else results.get((i, j))
                if not isinstance(part, _Option):
                    continue
                cand = start + part
                if current is None or cand.key(self.p.layers_first) < current.key(self.p.layers_first):
                    best[j], cut_from[j] = cand, i
        cuts = set()
        j = k
        while j > 0:
            cuts.add(j)
            j = cut_from[j]
        chosen = best[k]
        assert chosen is not None
        declines = []
        bounds = sorted(cuts | {0})
        for left, cut, right in zip(bounds, bounds[1:], bounds[2:]):
            # Why the two groups around this cut are not one: their union, else the shortest
            # refused run across the cut.
            found = results.get((left, right))
            span = (left, right)
            if found is None:
                crossing = sorted(
                    ((i, j) for (i, j) in results if i < cut < j), key=lambda ij: (ij[1] - ij[0], ij[0])
                )
                if not crossing:
                    continue
                span = crossing[0]
                found = results[span]
            if isinstance(found, _Option):
                found = Decline(
                    Reason.NOT_PROFITABLE,
                    "merging these layers would rule out a cheaper merge of their neighbours",
                )
            if found.reason is Reason.NOTHING_TO_MERGE:
                continue
            names = tuple(n.name for _, seg in segments[span[0] : span[1]] for n in seg)
            declines.append((names, found))
        return _Option(
            chosen.macs,
            chosen.params,
            chosen.layers,
            chosen.merges,
            chosen.resums,
            chosen.declines + tuple(declines),
        )

    def _run_block(self, segments: Sequence[tuple[str, tuple[LinearNode, ...]]]) -> Block | None:
        out: list[Any] = []
        for a, seg in segments:
            b = self.block(a, seg)
            if b is None:
                return None
            out += list(b)
        return tuple(out)

    def segment_best(self, a: str, seg: tuple[LinearNode, ...]) -> _Option:
        """A unary node kept; a parallel block collapsed, kept, or with some branches merged."""
        last = seg[-1]
        if last.kind.is_unary:
            return self.kept(seg)
        branches, tree = self._branches(a, seg)
        overlap = self._overlap(branches)
        if overlap:
            kept = self.kept(seg)  # shared layers: the block stays as it is or collapses whole
        else:
            kept = self.kept(tree)
            for br in branches:
                kept = kept + self.best(a, br.tensor, br.nodes)
        options = [kept]
        m = self.segment_map(a, seg)
        if isinstance(m, Decline):
            whole: _Option | Decline = m
        else:
            whole = self.merge(seg, a, last.output, m, self.block(a, seg))
        if isinstance(whole, _Option):
            options.append(whole)
        if last.kind is OpKind.SUM and len(branches) > 2 and not overlap:
            partial = self._partial_sum(a, last, branches, tree)
            if partial is not None:
                options.append(partial)
        chosen = self._pick(options)
        if chosen is not whole and isinstance(whole, Decline) and whole.reason is not Reason.NOTHING_TO_MERGE:
            chosen = chosen + _Option(0, 0, 0, declines=((tuple(n.name for n in seg), whole),))
        return chosen

    def _partial_sum(
        self, a: str, last: LinearNode, branches: list[_Branch], tree: tuple[LinearNode, ...]
    ) -> _Option | None:
        """Greedy: each branch joins the first group it merges with exactly and profitably."""
        branch_maps: list[Map | Decline] = []
        for br in branches:
            m = self.map(a, br.tensor, br.nodes)
            branch_maps.append(scaled(m, br.coef) if not isinstance(m, Decline) else m)
        groups: list[list[int]] = []
        merged: list[_Option | None] = []
        for bi, m in enumerate(branch_maps):
            if not isinstance(m, Decline):
                for gi, group in enumerate(groups):
                    if isinstance(branch_maps[group[0]], Decline):
                        continue
                    parts = [p for i in group + [bi] if not isinstance(p := branch_maps[i], Decline)]
                    cand = add(parts)  # parts: all of the group's maps (a group holds no Decline)
                    members = tuple(n for i in group + [bi] for n in branches[i].nodes)
                    if isinstance(cand, Decline) or not members:
                        continue
                    block = (
                        Parallel(tuple(self.series_block(a, branches[i].nodes) or () for i in group + [bi])),
                    )
                    option = self.merge(members, a, last.output, cand, block, adds=len(group))
                    if isinstance(option, _Option) and not self.p.layers_first:
                        current = merged[gi] or self.best(
                            a, branches[group[0]].tensor, branches[group[0]].nodes
                        )
                        alone = self.best(a, branches[bi].tensor, branches[bi].nodes)
                        if (option.macs, option.params) > (
                            current.macs + alone.macs,
                            current.params + alone.params,
                        ):
                            continue  # joining costs more than keeping the branch apart
                    if isinstance(option, _Option):
                        group.append(bi)
                        merged[gi] = option
                        break
                else:
                    groups.append([bi])
                    merged.append(None)
                continue
            groups.append([bi])
            merged.append(None)
        if not any(len(g) > 1 for g in groups):
            return None
        total = self.kept(tree)
        terms: list[tuple[str, float]] = []
        for group, chosen in zip(groups, merged):
            if len(group) == 1:
                br = branches[group[0]]
                total = total + self.best(a, br.tensor, br.nodes)
                terms.append((br.tensor, br.coef))
                continue
            assert chosen is not None
            (one,) = chosen.merges
            y = self.g.new_name(f"{last.output}/{one.sources[0]}")
            self.p.out.fresh.add(y)
            total = total + _Option(chosen.macs, chosen.params, 1, (replace(one, kind="sum", y=y),))
            terms.append((y, 1.0))
        adds = max(len(terms) - 1, 1)  # the rebuilt sum: one add fewer per term merged away
        return total + _Option(0, 0, adds - len(tree), resums=(Resum(tree, tuple(terms), last.output),))


@dataclass(frozen=True)
class _Branch:
    """One term of a parallel block: ``coef * tensor``, computed from the block input by ``nodes``."""

    tensor: str
    coef: float
    nodes: tuple[LinearNode, ...]


def _plain_pointwise(spec: Map) -> bool:
    """A 1x1 conv without padding (padding case 1 of DESIGN.md: zeros stay zeros through it)."""
    return isinstance(spec, ConvSpec) and spec.is_pointwise and not spec.is_padded


_TAGS = {OpKind.BATCHNORM: "bn", OpKind.POOL: "avgpool"}


def _kind(nodes: Sequence[LinearNode]) -> str:
    """The merge's detail (:meth:`convfuse.report.MergeKind.of` groups it): a chain's op tags
    joined by ``+`` (identities left out), ``sum``/``concat`` for one parallel block, ``sum+chain``
    for a block with layers around it."""
    kinds = [n.kind for n in nodes]
    if OpKind.SUM in kinds or OpKind.CONCAT in kinds:
        block = "concat" if OpKind.CONCAT in kinds else "sum"
        return block if kinds[-1] in (OpKind.SUM, OpKind.CONCAT) else f"{block}+chain"
    return "+".join(n.tag or _TAGS.get(n.kind, n.kind.value) for n in nodes if n.kind is not OpKind.IDENTITY)


def _default_dtype() -> Any:
    return np.dtype(np.float32)
