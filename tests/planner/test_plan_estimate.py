"""The shape-only estimate bounds the real merge's cost (the planner judges candidates on it)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convfuse import estimate
from convfuse.algebra import add, compose, cost
from convfuse.decline import Decline, Reason
from convfuse.spec import ConvSpec


@st.composite
def _spec(draw: st.DrawFn, cin: int, cout: int | None = None, ndim: int = 2, padded: bool = True) -> ConvSpec:
    choices = [g for g in (1, 2, cin) if cin % g == 0 and (cout is None or cout % g == 0)]
    groups = draw(st.sampled_from(choices))
    cout = cout if cout is not None else groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    pads = tuple(
        (draw(st.integers(0, 2)), draw(st.integers(0, 2))) if padded else (0, 0) for _ in range(ndim)
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    weight = torch.randn(cout, cin // groups, *kernel, dtype=torch.float64, generator=gen)
    bias = torch.randn(cout, dtype=torch.float64, generator=gen) if draw(st.booleans()) else None
    return ConvSpec(weight=weight, bias=bias, stride=stride, dilation=dilation, groups=groups, pads=pads)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_compose_estimate_bounds_and_matches_dense_results(data: st.DataObject) -> None:
    a = data.draw(_spec(4))
    b = data.draw(_spec(a.out_channels, padded=False))
    merged = compose(a, b)
    if isinstance(merged, Decline):
        return
    shape = estimate.compose_shape(a, b)
    assert shape.stride == merged.stride and shape.pads == merged.pads
    assert cost([shape]).macs >= cost([merged]).macs and cost([shape]).params >= cost([merged]).params
    if shape.groups == merged.groups:
        assert shape.kernel_size == merged.kernel_size and shape.dilation == merged.dilation


@st.composite
def _branches(draw: st.DrawFn, cin: int = 4, slack_offset: int = 0) -> list[ConvSpec]:
    """2-3 summable branches: one stride and one slack (``begin + end - extent`` per dim, what fixes
    the output grid), kernels, dilations and the split of the pads drawn freely. ``slack_offset``
    moves the last branch's slack by that much (its grid then differs: the negative twin)."""
    ndim = 2
    first = draw(_spec(cin))
    count = draw(st.integers(2, 3))
    slack = [b + e - x for (b, e), x in zip(first.pads, first.extent)]
    out = [first]
    for index in range(1, count):
        shift = slack_offset if index == count - 1 else 0
        kernel, dilation, pads = [], [], []
        for dim in range(ndim):
            d = draw(st.integers(1, 2))
            need = -(slack[dim] + shift)  # the extent that leaves pads >= 0
            k_min = max(1, -(-(need - 1) // d) + 1)
            k = draw(st.integers(k_min, k_min + 2))
            total = slack[dim] + shift + d * (k - 1) + 1
            begin = draw(st.integers(0, total))
            kernel.append(k)
            dilation.append(d)
            pads.append((begin, total - begin))
        groups = draw(
            st.sampled_from([g for g in (1, 2, cin) if cin % g == 0 and first.out_channels % g == 0])
        )
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        weight = torch.randn(first.out_channels, cin // groups, *kernel, dtype=torch.float64, generator=gen)
        bias = (
            torch.randn(first.out_channels, dtype=torch.float64, generator=gen)
            if draw(st.booleans())
            else None
        )
        out.append(
            ConvSpec(
                weight=weight,
                bias=bias,
                stride=first.stride,
                dilation=tuple(dilation),
                groups=groups,
                pads=tuple(pads),
            )
        )
    return out


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_add_estimate_bounds_and_matches_dense_results(data: st.DataObject) -> None:
    """Every generated case is summable (one stride, one output grid), so every one is checked."""
    branches = data.draw(_branches())
    merged = add(branches)
    assert not isinstance(merged, Decline), merged
    shape = estimate.add_shape(branches)
    assert shape.stride == merged.stride and shape.pads == merged.pads
    assert cost([shape]).macs >= cost([merged]).macs
    if shape.groups == merged.groups:
        assert shape.kernel_size == merged.kernel_size and shape.dilation == merged.dilation


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data(), offset=st.sampled_from([-1, 1]))
def test_add_of_branches_on_different_grids_is_declined(data: st.DataObject, offset: int) -> None:
    """Twin: the same branches with the last one's slack moved by one are not summable."""
    branches = data.draw(_branches(slack_offset=offset))
    merged = add(branches)
    assert isinstance(merged, Decline) and merged.reason is Reason.GRID_MISMATCH
