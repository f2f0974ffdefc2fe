"""Cases for the border-correction rule (issue 14): a biased pointwise A then a padded B.

Shared by ``tests/algebra/test_border.py`` and ``benchmarks/border_precision.py``.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from convfuse.border import BorderMerge, border_ring
from convfuse.spec import ConvSpec
from tests.support.helpers import rel_err
from tests.support.strategies import channel_plan, geometry, rand

__all__ = ["case2_pair", "input_sizes", "min_input", "merge_error", "oracle_ring"]


@st.composite
def case2_pair(draw: st.DrawFn, mode: str = "zeros") -> tuple[ConvSpec, ConvSpec]:
    """A: kernel 1, unpadded, any stride and groups, with bias; B: kernel 1-5 (3D: 1-4), stride
    1-3, dilation 1-3 (3D: 1-2), any groups, asymmetric pads 0-3 in ``mode``, bias or not."""
    n = draw(st.integers(1, 3))
    ci, c1, co, ga, gb = draw(channel_plan())
    sa = tuple(draw(st.integers(1, 3)) for _ in range(n))
    gb_geom = draw(geometry(n, padded=True, max_kernel=5))
    seed = draw(st.integers(0, 2**20))
    a = ConvSpec(rand(c1, ci // ga, *(1,) * n, seed=seed), rand(c1, seed=seed + 1), stride=sa, groups=ga)
    b = ConvSpec(
        rand(co, c1 // gb, *gb_geom.kernel, seed=seed + 2),
        rand(co, seed=seed + 3) if draw(st.booleans()) else None,
        stride=gb_geom.stride,
        dilation=gb_geom.dilation,
        groups=gb,
        pads=gb_geom.pads,
        padding_mode=mode,
    )
    return a, b


def min_input(a: ConvSpec, b: ConvSpec) -> tuple[int, ...]:
    """Smallest input size per dim for which A then B has an output (the ring covers it all)."""
    sizes = []
    for (pb, pe), ext, sa in zip(b.pads, b.extent, a.stride):
        n_a = max(1, ext - pb - pe)
        if b.padding_mode == "reflect":
            n_a = max(n_a, pb + 1, pe + 1)
        sizes.append((n_a - 1) * sa + 1)
    return tuple(sizes)


def input_sizes(a: ConvSpec, b: ConvSpec, extras: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """``min_input`` grown by each of ``extras`` (cycled over dims)."""
    low = min_input(a, b)
    return [tuple(m + e[i % len(e)] for i, m in enumerate(low)) for e in extras]


def oracle_ring(a: ConvSpec, b: ConvSpec, merge: BorderMerge, spatial: tuple[int, ...]) -> torch.Tensor:
    """The ring as torch computes it: ``Bnb(pad(bA * ones(nA))) - Kint``."""
    assert a.bias is not None
    ones = torch.ones(1, a.out_channels, *a.output_size(spatial), dtype=torch.float64)
    k = b.replace(bias=None).apply(ones * torch.from_numpy(a.bias).reshape(1, -1, *([1] * a.ndim)))[0]
    return k - torch.from_numpy(merge.interior).reshape(-1, *([1] * a.ndim))


def merge_error(a: ConvSpec, b: ConvSpec, merge: BorderMerge, spatial: tuple[int, ...], seed: int) -> float:
    """Relative error of ``merge.spec(x) + ring`` against running A then B with torch."""
    x = rand(2, a.in_channels, *spatial, seed=seed)
    ref = b.apply(a.apply(x))
    out = merge.spec.apply(x) + torch.from_numpy(border_ring(merge, spatial))
    return rel_err(ref, out)
