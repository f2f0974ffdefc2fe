"""Hypothesis strategies for convolutions and the inputs that exercise them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from convfuse.spec import PADDING_MODES, ConvSpec

__all__ = ["Geometry", "conv_chain", "conv_pair", "parallel_branches", "rand", "input_for"]

_MAX_KERNEL = {1: 7, 2: 7, 3: 4}
_MAX_DILATION = {1: 3, 2: 3, 3: 2}


def rand(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@dataclass(frozen=True)
class Geometry:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]


@st.composite
def geometry(
    draw: st.DrawFn, n: int, padded: bool, max_pad: int = 3, max_kernel: int = 7, max_stride: int = 3
) -> Geometry:
    kernel = tuple(draw(st.integers(1, min(max_kernel, _MAX_KERNEL[n]))) for _ in range(n))
    stride = tuple(draw(st.integers(1, max_stride)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, _MAX_DILATION[n])) for _ in range(n))
    if padded:
        pads = tuple((draw(st.integers(0, max_pad)), draw(st.integers(0, max_pad))) for _ in range(n))
    else:
        pads = ((0, 0),) * n
    return Geometry(kernel, stride, dilation, pads)


@st.composite
def channel_plan(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """(Ci, C1, Co, gA, gB) covering dense, shared-divisor, mixed and depthwise groupings."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise_a", "depthwise_b", "both_depthwise"]))
    if kind == "dense":
        return draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 4)), 1, 1
    if kind == "grouped":
        ga, gb = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2, 3, 4]))
        c1 = math.lcm(ga, gb) * draw(st.integers(1, 2))
        return ga * draw(st.integers(1, 2)), c1, gb * draw(st.integers(1, 2)), ga, gb
    c = draw(st.integers(2, 6))
    if kind == "depthwise_a":
        return c, c, draw(st.integers(1, 4)), c, 1
    if kind == "depthwise_b":
        return draw(st.integers(1, 4)), c, c, 1, c
    return c, c, c, c, c


def _conv(
    shape_out: int, shape_in: int, groups: int, g: Geometry, bias: bool, mode: str, seed: int
) -> ConvSpec:
    weight = rand(shape_out, shape_in // groups, *g.kernel, seed=seed)
    return ConvSpec(
        weight=weight,
        bias=rand(shape_out, seed=seed + 1) if bias else None,
        stride=g.stride,
        dilation=g.dilation,
        groups=groups,
        pads=g.pads,
        padding_mode=mode,
    )


@st.composite
def conv_pair(
    draw: st.DrawFn, b_padded: bool = False, a_pointwise: bool = False
) -> tuple[ConvSpec, ConvSpec]:
    """Two convs A then B. ``b_padded`` with ``a_pointwise`` draws DESIGN case 1 (exact)."""
    n = draw(st.integers(1, 3))
    ci, c1, co, ga, gb = draw(channel_plan())
    ga_geom = draw(geometry(n, padded=not a_pointwise))
    if a_pointwise:
        ga_geom = Geometry((1,) * n, ga_geom.stride, ga_geom.dilation, ((0, 0),) * n)
    gb_geom = draw(geometry(n, padded=b_padded))
    mode_a = draw(st.sampled_from(PADDING_MODES)) if not a_pointwise else "zeros"
    bias_a = False if a_pointwise and b_padded else draw(st.booleans())
    seed = draw(st.integers(0, 2**20))
    a = _conv(c1, ci, ga, ga_geom, bias_a, mode_a, seed)
    b = _conv(co, c1, gb, gb_geom, draw(st.booleans()), "zeros", seed + 7)
    return a, b


@st.composite
def conv_chain(draw: st.DrawFn) -> list[ConvSpec]:
    """3-4 convs in a row (first one padded in any mode, later ones unpadded), 1D or 2D."""
    n = draw(st.integers(1, 2))
    length = draw(st.integers(3, 4))
    channels = [draw(st.integers(1, 4)) for _ in range(length + 1)]
    seed = draw(st.integers(0, 2**20))
    chain = []
    for i in range(length):
        g = draw(geometry(n, padded=i == 0, max_kernel=4, max_stride=2))
        mode = draw(st.sampled_from(PADDING_MODES)) if i == 0 else "zeros"
        chain.append(_conv(channels[i + 1], channels[i], 1, g, draw(st.booleans()), mode, seed + 11 * i))
    return chain


@st.composite
def parallel_branches(draw: st.DrawFn) -> list[ConvSpec]:
    """2-4 convs of one input whose outputs align (equal stride, equal begin+end-extent)."""
    n = draw(st.integers(1, 3))
    ci, co = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(n))
    slack = tuple(draw(st.integers(-4, 1)) for _ in range(n))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    seed = draw(st.integers(0, 2**20))
    branches = []
    for i in range(draw(st.integers(2, 4))):
        kernel, dilation, pads = [], [], []
        for dim in range(n):
            k = draw(st.integers(1, _MAX_KERNEL[n]))
            d = draw(st.integers(1, _MAX_DILATION[n]))
            if slack[dim] + d * (k - 1) + 1 < 0:  # too small to reach the common grid
                k, d = -slack[dim], 1
            total = slack[dim] + d * (k - 1) + 1  # begin + end
            begin = draw(st.integers(0, total))
            kernel.append(k)
            dilation.append(d)
            pads.append((begin, total - begin))
        g = Geometry(tuple(kernel), stride, tuple(dilation), tuple(pads))
        groups = draw(st.sampled_from([gr for gr in (1, 2, ci) if ci % gr == 0 and co % gr == 0]))
        branches.append(_conv(co, ci, groups, g, draw(st.booleans()), mode, seed + 13 * i))
    return branches


def _min_size(chain: list[ConvSpec], dim: int) -> int:
    """Smallest input size along ``dim`` for which ``chain`` runs and has an output."""
    size = 1
    while True:
        cur = size
        for s in chain:
            b, e = s.pads[dim]
            if s.padding_mode != "zeros" and max(b, e) >= cur:
                break
            cur = (cur + b + e - s.extent[dim]) // s.stride[dim] + 1
            if cur < 1:
                break
        else:
            return size
        size += 1


def input_for(chains: list[list[ConvSpec]], channels: int, extra: tuple[int, ...], seed: int) -> torch.Tensor:
    """A ``[2, channels, *spatial]`` input on which every chain in ``chains`` produces output."""
    n = chains[0][0].ndim
    sizes = [max(_min_size(c, dim) for c in chains) + extra[dim % len(extra)] for dim in range(n)]
    return rand(2, channels, *sizes, seed=seed)
