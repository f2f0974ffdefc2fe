"""The shape of a merged convolution, predicted from geometry alone, before any weight is built.

A front end asks the cost policy whether a merge pays *before* paying for it: the merged
weight of a long chain can be large. These functions mirror :func:`convfuse.algebra.compose`
and :func:`convfuse.algebra.add` followed by :func:`convfuse.algebra.simplify` on tap
*positions* instead of tap values, and return a :class:`~convfuse.spec.ConvSpec` whose weight
is shape-only (:func:`convfuse.spec.shape_only`: no data). Its :func:`convfuse.algebra.cost` is an
upper bound of the real merge's cost; it is equal unless weights cancel or hide extra block
structure.

Tap positions per spatial dim: a conv with kernel ``k`` and dilation ``d`` reads offsets
``{j*d : j < k}``. ``a`` then ``b`` reads ``{p + q*sA : p in A, q in B}``; a parallel sum reads
the union of each branch's offsets shifted to the common window. The merged kernel is the
smallest dilated kernel covering the positions: dilation ``f = gcd(positions)``, size
``max / f + 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce

from .spec import ConvSpec, shape_only

__all__ = ["compose_shape", "chain_shape", "add_shape"]

_Positions = tuple[tuple[int, ...], ...]  # per spatial dim, sorted offsets


def _positions(spec: ConvSpec) -> _Positions:
    return tuple(tuple(j * d for j in range(k)) for k, d in zip(spec.kernel_size, spec.dilation))


def _shaped(
    out_channels: int,
    in_channels: int,
    groups: int,
    positions: _Positions,
    stride: Sequence[int],
    pads: Sequence[tuple[int, int]],
    bias: bool,
) -> ConvSpec:
    """A shape-only spec with the smallest dilated kernel covering ``positions``."""
    kernel, dilation = [], []
    for pos in positions:
        f = reduce(math.gcd, pos, 0) or 1
        kernel.append(max(pos) // f + 1)
        dilation.append(f if max(pos) else 1)
    weight = shape_only((out_channels, in_channels // groups, *kernel))
    b = shape_only((out_channels,)) if bias else None
    return ConvSpec(
        weight=weight, bias=b, stride=tuple(stride), dilation=tuple(dilation), groups=groups, pads=tuple(pads)
    )


def compose_shape(a: ConvSpec, b: ConvSpec) -> ConvSpec:
    """Shape of ``compose(a, b)``: stride ``sA*sB``, offsets ``p + q*sA``, groups ``gcd``."""
    positions = tuple(
        tuple(sorted({p + q * s for p in pa for q in pb}))
        for pa, pb, s in zip(_positions(a), _positions(b), a.stride)
    )
    return _shaped(
        b.out_channels,
        a.in_channels,
        math.gcd(a.groups, b.groups),
        positions,
        [x * y for x, y in zip(a.stride, b.stride)],
        [(a0 + s * b0, a1 + s * b1) for (a0, a1), (b0, b1), s in zip(a.pads, b.pads, a.stride)],
        a.bias is not None or b.bias is not None,
    )


def chain_shape(specs: Sequence[ConvSpec]) -> ConvSpec:
    """Shape of ``compose_chain(specs)`` (left fold, as the algebra computes it)."""
    return reduce(compose_shape, specs[1:], specs[0])


def add_shape(specs: Sequence[ConvSpec]) -> ConvSpec:
    """Shape of ``add(specs)``: every branch's offsets shifted into the window at ``-max(begin)``."""
    first = specs[0]
    begin = [max(s.pads[i][0] for s in specs) for i in range(first.ndim)]
    end = [max(s.pads[i][1] for s in specs) for i in range(first.ndim)]
    positions = tuple(
        tuple(sorted({begin[i] - s.pads[i][0] + p for s in specs for p in _positions(s)[i]}))
        for i in range(first.ndim)
    )
    return _shaped(
        first.out_channels,
        first.in_channels,
        reduce(math.gcd, [s.groups for s in specs]),
        positions,
        first.stride,
        list(zip(begin, end)),
        any(s.bias is not None for s in specs),
    )
