"""The one planner on IR graphs built from specs: chains, sums, shared weights, declines."""

from __future__ import annotations

import torch

from convfuse.algebra import ChannelAffine, affine_conv
from convfuse.decline import Reason
from convfuse.ir import LinearGraph, LinearNode, OpKind
from convfuse.planner import Plan, plan
from convfuse.report import MergeKind
from convfuse.spec import ConvSpec


def _bn(c: int) -> ConvSpec:
    g = torch.Generator().manual_seed(c)
    affine = ChannelAffine(
        torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
        torch.randn(c, generator=g, dtype=torch.float64),
    )
    return affine_conv(affine, 2)


def _conv(ci: int, co: int, k: int, groups: int = 1, pad: int = 0, bias: bool = True) -> ConvSpec:
    g = torch.Generator().manual_seed(ci * 100 + co * 10 + k)
    return ConvSpec(
        weight=torch.randn(co, ci // groups, k, k, generator=g, dtype=torch.float64),
        bias=torch.randn(co, generator=g, dtype=torch.float64) if bias else None,
        groups=groups,
        pads=((pad, pad), (pad, pad)),
    )


def _node(name: str, spec: ConvSpec, x: str, y: str, key: object = None) -> LinearNode:
    kind = (
        OpKind.CONV
        if not (spec.groups == spec.in_channels == spec.out_channels and spec.is_pointwise)
        else OpKind.AFFINE
    )
    return LinearNode(
        name, kind, (x,), y, lambda info, s=spec: s, ndim=spec.ndim, in_channels=spec.in_channels,
        weights={key if key is not None else name: spec.params()},
    )  # fmt: skip


def _chain(specs: list[ConvSpec], policy: str) -> Plan:
    nodes = [_node(f"l{k}", s, f"t{k}", f"t{k + 1}") for k, s in enumerate(specs)]
    return plan(LinearGraph(nodes, {f"t{len(specs)}"}, {f"t{len(specs)}"}), policy)


def _spans(p: Plan) -> list[tuple[str, ...]]:
    return [m.sources for m in p.merges]


def test_planner_folds_each_batchnorm_but_keeps_depthwise_apart() -> None:
    specs = [_conv(32, 32, 3, groups=32, pad=1, bias=False), _bn(32), _conv(32, 64, 1, bias=False), _bn(64)]
    p = _chain(specs, "flops")
    covered = {s for m in p.merges for s in m.sources}
    assert {"l1", "l3"} <= covered  # both BatchNorms fold (into whichever neighbour is cheaper)
    assert all(m.after <= m.before for m in p.merges)
    assert not any("l0" in m.sources and "l2" in m.sources for m in p.merges)
    assert [d.reason for _, d in p.declines] == [Reason.NOT_PROFITABLE]
    together = _chain(specs, "always")
    assert _spans(together) == [("l0", "l1", "l2", "l3")]


def test_planner_never_merges_a_run_without_a_conv() -> None:
    p = _chain([_bn(8), _bn(8)], "always")
    assert p.merges == [] and p.declines == []


def test_planner_splits_at_an_inexact_pair() -> None:
    p = _chain([_conv(8, 8, 3, pad=1), _conv(8, 8, 3, pad=1), _bn(8)], "always")
    assert _spans(p) == [("l1", "l2")]
    assert [d.reason for _, d in p.declines] == [Reason.PADDED_AFTER_SPATIAL]


def test_expansion_chain_splits_where_the_flops_are_lowest() -> None:
    """1x1 8->64, 1x1 64->8, 3x3 8->4, 3x3 4->8: the two 1x1 become one 8->8 1x1 that folds
    into the first 3x3; one 5x5 (the 'always' answer) costs 2.4x more MACs and is refused."""
    specs = [_conv(8, 64, 1), _conv(64, 8, 1), _conv(8, 4, 3), _conv(4, 8, 3)]
    p = _chain(specs, "flops")
    assert _spans(p) == [("l0", "l1", "l2")]
    assert all(m.after <= m.before for m in p.merges)
    assert _spans(_chain(specs, "always")) == [("l0", "l1", "l2", "l3")]


def test_sum_leaves_out_a_branch_that_does_not_compose() -> None:
    """x + a(x) + b(c(x)) where b(c(x)) is padded after spatial: the other two terms merge."""
    a, c, b = _conv(8, 8, 3, pad=1), _conv(8, 8, 3, pad=1), _conv(8, 8, 3, pad=1)
    nodes = [
        _node("a", a, "x", "ya"),
        _node("c", c, "x", "yc"),
        _node("b", b, "yc", "yb"),
        LinearNode("s1", OpKind.SUM, ("x", "ya"), "s1", coefs=(1.0, 1.0)),
        LinearNode("s2", OpKind.SUM, ("s1", "yb"), "y", coefs=(1.0, 1.0)),
    ]
    p = plan(LinearGraph(nodes, {"y"}, {"y"}), "flops")
    assert [m.sources for m in p.merges] == [("a",)] and p.merges[0].group is MergeKind.SUM
    (resum,) = p.resums
    assert [t for t, _ in resum.terms] == [p.merges[0].y, "yb"]
    assert Reason.PADDED_AFTER_SPATIAL in {d.reason for _, d in p.declines}


def test_shared_weights_are_not_copied_under_flops() -> None:
    """One conv called twice (same weights), before a BN and before a 1x1: merging each path
    would copy the conv's weights into both, so under flops neither path merges."""
    conv = _conv(8, 8, 3, pad=1, bias=False)
    nodes = [
        _node("conv", conv, "x", "a", key="w"),
        _node("bn", _bn(8), "a", "ya"),
        _node("conv_again", conv, "z", "b", key="w"),
        _node("pw", _conv(8, 8, 1), "b", "yb"),
    ]
    p = plan(LinearGraph(nodes, {"ya", "yb"}, {"ya", "yb"}), "flops")
    assert p.merges == []
    assert {d.reason for _, d in p.declines} == {Reason.NOT_PROFITABLE}
    assert len(plan(LinearGraph(nodes, {"ya", "yb"}, {"ya", "yb"}), "always").merges) == 2
