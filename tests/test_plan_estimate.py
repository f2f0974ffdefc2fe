"""The shape-only estimate bounds the real merge's cost (the planner judges candidates on it)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convfuse import estimate
from convfuse.algebra import add, compose, cost
from convfuse.decline import Decline
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


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_add_estimate_bounds_and_matches_dense_results(data: st.DataObject) -> None:
    first = data.draw(_spec(4))
    branches = [first] + [
        data.draw(_spec(4, first.out_channels)) for _ in range(data.draw(st.integers(1, 2)))
    ]
    merged = add(branches)
    if isinstance(merged, Decline):
        return
    shape = estimate.add_shape(branches)
    assert cost([shape]).macs >= cost([merged]).macs
    if shape.groups == merged.groups:
        assert shape.kernel_size == merged.kernel_size and shape.dilation == merged.dilation
