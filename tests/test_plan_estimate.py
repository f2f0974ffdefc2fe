"""The shape-only estimate bounds the real merge's cost, and the chain planner uses it well."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convfuse import estimate
from convfuse.algebra import ChannelAffine, add, affine_conv, compose, cost
from convfuse.decline import Decline, Reason
from convfuse.plan import plan_chain, plan_sum
from convfuse.spec import ConvSpec


@st.composite
def _spec(draw: st.DrawFn, cin: int, cout: int | None = None, ndim: int = 2, padded: bool = True) -> ConvSpec:
    choices = [g for g in (1, 2, cin) if cin % g == 0 and (cout is None or cout % g == 0)]
    groups = draw(st.sampled_from(choices))
    cout = cout if cout is not None else groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    pads = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) if padded else (0, 0) for _ in range(ndim))
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
    branches = [first] + [data.draw(_spec(4, first.out_channels)) for _ in range(data.draw(st.integers(1, 2)))]
    merged = add(branches)
    if isinstance(merged, Decline):
        return
    shape = estimate.add_shape(branches)
    assert cost([shape]).macs >= cost([merged]).macs
    if shape.groups == merged.groups:
        assert shape.kernel_size == merged.kernel_size and shape.dilation == merged.dilation


def _bn(c: int) -> ConvSpec:
    g = torch.Generator().manual_seed(c)
    affine = ChannelAffine(torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64))
    return affine_conv(affine, 2)


def _conv(ci: int, co: int, k: int, groups: int = 1, pad: int = 0, bias: bool = True) -> ConvSpec:
    g = torch.Generator().manual_seed(ci * 100 + co * 10 + k)
    return ConvSpec(
        weight=torch.randn(co, ci // groups, k, k, generator=g, dtype=torch.float64),
        bias=torch.randn(co, generator=g, dtype=torch.float64) if bias else None,
        groups=groups,
        pads=((pad, pad), (pad, pad)),
    )


def test_planner_folds_each_batchnorm_but_keeps_depthwise_apart() -> None:
    specs = [_conv(32, 32, 3, groups=32, pad=1, bias=False), _bn(32), _conv(32, 64, 1, bias=False), _bn(64)]
    anchors = [True, False, True, False]
    plan = plan_chain(specs, anchors, "flops")
    covered = {k for seg in plan.segments for k in range(seg.start, seg.stop)}
    assert {1, 3} <= covered  # both BatchNorms fold (into whichever neighbour is cheaper)
    assert all(seg.after <= seg.before for seg in plan.segments)
    assert not any(seg.start == 0 and seg.stop > 2 for seg in plan.segments)
    assert [d.reason for _, _, d in plan.kept] == [Reason.NOT_PROFITABLE]
    together = plan_chain(specs, anchors, "always")
    assert [(s.start, s.stop) for s in together.segments] == [(0, 4)]


def test_planner_never_merges_a_run_without_a_conv() -> None:
    plan = plan_chain([_bn(8), _bn(8)], [False, False], "always")
    assert plan.segments == () and plan.kept == ()


def test_planner_splits_at_an_inexact_pair() -> None:
    specs = [_conv(8, 8, 3, pad=1), _conv(8, 8, 3, pad=1), _bn(8)]
    plan = plan_chain(specs, [True, True, False], "always")
    assert [(s.start, s.stop) for s in plan.segments] == [(1, 3)]
    assert [d.reason for _, _, d in plan.kept] == [Reason.PADDED_AFTER_SPATIAL]


def test_sum_plan_skips_a_branch_that_does_not_compose() -> None:
    bad = [_conv(8, 8, 3, pad=1), _conv(8, 8, 3, pad=1)]  # padded after spatial: not one conv
    plan = plan_sum([[_conv(8, 8, 3, pad=1)], bad, []], 8, 2, "flops")
    assert plan.used == (0, 2) and plan.spec is not None
    assert [d.reason for _, d in plan.branch_declines] == [Reason.PADDED_AFTER_SPATIAL]
