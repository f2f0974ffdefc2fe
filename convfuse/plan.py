"""Which runs to merge: the cost policy applied to chains and sums, graph-free.

A front end finds a chain of linear layers (or the branches of a sum) and hands their
:class:`~convfuse.spec.ConvSpec` values here; this module asks the policy first on the
predicted shape (:mod:`convfuse.estimate`), computes merged weights only for merges that can
pay, and returns what to merge and, for everything left alone, a :class:`Decline`.

Under the ``latency`` policy the :class:`~convfuse.policy.Judge` times each candidate
(:mod:`convfuse.latency`): the planner hands it the layers, the merged conv (shape-only before
the weights are built) and the input shape of the run (``None`` dims where unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import estimate
from .algebra import Cost, add, compose, compose_chain, cost, identity
from .decline import Decline, Reason
from .latency import Candidate, Parallel, Shape, Timing, advance
from .policy import Decision, Judge, Policy
from .spec import ConvSpec

__all__ = ["MAX_CHAIN", "Segment", "ChainPlan", "SumPlan", "plan_chain", "plan_sum"]

#: Longest run of layers merged into one conv (longer runs are split into several).
MAX_CHAIN = 12


@dataclass(frozen=True)
class Segment:
    """Layers ``start`` to ``stop - 1`` of a chain become the single conv ``spec``."""

    start: int
    stop: int
    spec: ConvSpec
    before: Cost
    after: Cost
    timing: Timing | None = None  # measured under the latency policy
    note: str = ""  # e.g. that the flops rule decided in place of a timing


@dataclass(frozen=True)
class ChainPlan:
    """The merges chosen for one chain, and for each place left cut, why."""

    segments: tuple[Segment, ...]
    kept: tuple[tuple[int, int, Decline], ...]  # (start, stop, reason) of refused runs


@dataclass(frozen=True)
class SumPlan:
    """The merge of a parallel sum: which branches, into what, or why not."""

    used: tuple[int, ...]  # indices of the branches merged
    spec: ConvSpec | None
    before: Cost
    after: Cost
    decline: Decline | None  # why the sum was not merged (spec is None)
    branch_declines: tuple[tuple[int, Decline], ...]  # branches left out, and why
    timing: Timing | None = None  # measured under the latency policy
    note: str = ""


def _scale(c: Cost, factor: int) -> tuple[int, int]:
    return (c.macs * factor, c.params)


def _input_shape(shape: Sequence[int | None] | None, first: ConvSpec) -> Shape:
    """``[N, C, *spatial]`` with ``None`` for unknown dims (all of them when ``shape`` does not fit)."""
    if shape is None or len(shape) != first.ndim + 2:
        return (None, first.in_channels) + (None,) * first.ndim
    return (shape[0], first.in_channels, *shape[2:])


def plan_chain(
    specs: Sequence[ConvSpec],
    anchors: Sequence[bool],
    policy: Policy | str | Judge = Policy.FLOPS,
    max_len: int = MAX_CHAIN,
    *,
    input_shape: Sequence[int | None] | None = None,
    dtype: Any = np.dtype(np.float32),
) -> ChainPlan:
    """Split the chain ``specs[0] -> specs[1] -> ...`` into runs and merge the runs that pay.

    A merged run must hold at least one ``anchors`` layer (a real convolution: a run of
    BatchNorms alone stays as it is). Every candidate run is judged by ``policy`` on its
    predicted shape before its weights are computed, and again on the merged conv. Among the
    allowed splits, dynamic programming picks the cheapest: fewest MACs then parameters then
    layers under ``flops``, fewest layers first under ``always`` and ``latency`` (every run
    allowed there measured no slower than its layers). MACs are normalised to the chain's final
    output grid. ``input_shape`` (``[N, C, *spatial]``, ``None`` where unknown) and ``dtype``
    (the model's) are what the latency policy times the runs on.
    """
    judge = Judge.of(policy)
    n = len(specs)
    shapes = [_input_shape(input_shape, specs[0])] if n else []
    for spec in specs:
        shapes.append(advance(shapes[-1], spec))

    def decide(i: int, j: int, before: Cost, merged: ConvSpec) -> Decision:
        candidate = Candidate(tuple(specs[i:j]), merged, shapes[i], dtype) if judge.times else None
        return judge.decide(before, cost([merged]), candidate)

    # tail[j]: output positions of layer j-1 per final output position (product of later strides).
    tail = [1] * (n + 1)
    for j in range(n - 1, -1, -1):
        tail[j] = tail[j + 1] * math.prod(specs[j].stride)
    results: dict[tuple[int, int], Segment | Decline] = {}
    for i in range(n):
        merged: ConvSpec | None = None  # compose_chain(specs[i:j-1]) when computed
        for j in range(i + 2, min(n, i + max_len) + 1):
            run = specs[i:j]
            if not any(anchors[i:j]):
                merged = None
                continue
            before = cost(run)
            shape = estimate.chain_shape(run)
            refused = decide(i, j, before, shape).decline
            if refused is not None:
                results[(i, j)] = refused
                merged = None
                continue
            step = compose(merged, specs[j - 1]) if merged is not None else compose_chain(run)
            if isinstance(step, Decline):
                results[(i, j)] = step
                break  # a left fold that fails here fails for every longer run from i
            after = cost([step])
            decision = decide(i, j, before, step)
            results[(i, j)] = decision.decline or Segment(i, j, step, before, after, decision.timing, decision.note)
            merged = step

    def key(total: tuple[int, int], layers: int) -> tuple[int, ...]:
        if judge.policy in (Policy.ALWAYS, Policy.LATENCY):
            return (layers, *total)
        return (*total, layers)

    # best[j] = (key, total cost, layers, previous cut, segment or None)
    best: list[tuple[tuple[int, ...], tuple[int, int], int, int, Segment | None] | None] = [None] * (n + 1)
    best[0] = ((0,), (0, 0), 0, -1, None)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_len), j):
            prev = best[i]
            if prev is None:
                continue
            if j == i + 1:
                seg: Segment | None = None
                c = _scale(cost([specs[i]]), tail[j])
            else:
                found = results.get((i, j))
                if not isinstance(found, Segment):
                    continue
                seg = found
                c = _scale(found.after, tail[j])
            total = (prev[1][0] + c[0], prev[1][1] + c[1])
            layers = prev[2] + 1
            candidate = (key(total, layers), total, layers, i, seg)
            if best[j] is None or candidate[0] < best[j][0]:
                best[j] = candidate
    segments: list[Segment] = []
    cuts = {n}
    j = n
    while j > 0:
        entry = best[j]
        assert entry is not None
        if entry[4] is not None:
            segments.append(entry[4])
        j = entry[3]
        cuts.add(j)
    segments.reverse()

    kept: list[tuple[int, int, Decline]] = []
    for cut in range(1, n):
        if cut not in cuts:
            continue
        # The shortest refused run across this cut explains why it stayed a cut.
        crossing = sorted(
            ((i, j) for (i, j) in results if i < cut < j),
            key=lambda ij: (ij[1] - ij[0], ij[0]),
        )
        if not crossing:
            continue
        i, j = crossing[0]
        found = results[(i, j)]
        if isinstance(found, Segment):
            found = Decline(
                Reason.NOT_PROFITABLE,
                "merging these layers would rule out a cheaper merge of their neighbours",
            )
        kept.append((i, j, found))
    return ChainPlan(tuple(segments), tuple(kept))


def plan_sum(
    branches: Sequence[Sequence[ConvSpec]],
    channels: int,
    ndim: int,
    policy: Policy | str | Judge = Policy.FLOPS,
    *,
    input_shape: Sequence[int | None] | None = None,
    dtype: Any = np.dtype(np.float32),
) -> SumPlan:
    """Merge ``sum_b chain_b(x)`` into one conv; an empty branch is ``x`` itself.

    Each branch is first composed (:func:`compose_chain`); branches that do not compose are left
    out with their reason and the rest still merge if at least two remain. The policy judges
    the sum on its predicted shape before :func:`add` builds it, and again on the result. An
    identity branch costs nothing before the merge (it is a plain tensor). ``input_shape`` and
    ``dtype`` are what the latency policy times the sum on.
    """
    judge = Judge.of(policy)
    composed: list[tuple[int, ConvSpec, Cost]] = []
    failed: list[tuple[int, Decline]] = []
    for index, chain in enumerate(branches):
        if not chain:
            composed.append((index, identity(channels, ndim, dtype=_dtype(branches)), Cost(0, 0)))
            continue
        spec = compose_chain(list(chain)) if len(chain) > 1 else chain[0]
        if isinstance(spec, Decline):
            failed.append((index, spec))
        else:
            composed.append((index, spec, cost(list(chain))))
    used = tuple(i for i, _, _ in composed)
    before = sum((c for _, _, c in composed), Cost(0, 0))
    if len(composed) < 2:
        return SumPlan(used, None, before, before, None, tuple(failed))
    specs = [s for _, s, _ in composed]
    original = (Parallel(tuple(tuple(branches[i]) for i in used)),)
    in_shape = (None, channels) + (None,) * ndim
    if input_shape is not None and len(input_shape) == ndim + 2:
        in_shape = (input_shape[0], channels, *input_shape[2:])

    def decide(merged: ConvSpec) -> Decision:
        candidate = Candidate(original, merged, in_shape, dtype) if judge.times else None
        return judge.decide(before, cost([merged]), candidate)

    shape = estimate.add_shape(specs) if _same_geometry_inputs(specs) else None
    if shape is not None:
        refused = decide(shape).decline
        if refused is not None:
            return SumPlan(used, None, before, cost([shape]), refused, tuple(failed))
    merged = add(specs)
    if isinstance(merged, Decline):
        return SumPlan(used, None, before, before, merged, tuple(failed))
    after = cost([merged])
    decision = decide(merged)
    if decision.decline is not None:
        return SumPlan(used, None, before, after, decision.decline, tuple(failed), decision.timing, decision.note)
    return SumPlan(used, merged, before, after, None, tuple(failed), decision.timing, decision.note)


def _same_geometry_inputs(specs: Sequence[ConvSpec]) -> bool:
    """Whether :func:`estimate.add_shape` can describe these branches (else :func:`add` declines)."""
    first = specs[0]
    return all(
        s.ndim == first.ndim
        and s.in_channels == first.in_channels
        and s.out_channels == first.out_channels
        and s.stride == first.stride
        for s in specs
    )


def _dtype(branches: Sequence[Sequence[ConvSpec]]) -> np.dtype:
    for chain in branches:
        if chain:
            return chain[0].dtype
    raise ValueError("a sum needs at least one branch that is not the identity")
