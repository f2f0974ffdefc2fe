"""Issue 11's blocks, written as public model code writes them, through both front ends.

Positive blocks collapse to their deploy form; each twin differs in one place that makes the
collapse inexact and keeps what it must. The torch front end's result is exported to ONNX so
both front ends are counted the same way (benchmarks/linear_regions.py prints the same table).
"""

from __future__ import annotations

import pytest
import torch

import convfuse
from benchmarks.linear_regions import counts, export
from benchmarks.region_blocks import BLOCKS, CASES, TWINS
from convfuse import Reason
from convfuse.border_map import border_merges
from tests.planner.test_region_properties import _run
from tests.support.helpers import rel_err

#: Deploy form of each block: (Conv, BN, Add, Gemm) after fusing.
DEPLOY = {
    "token mixer x + s*(mixer(x) - bn(x))": (6, 0, 2, 0),  # per block: a dw conv, two 1x1, the MLP residual
    "padded branch conv_chain(F.pad(x)) + skip(x)": (2, 0, 0, 0),
    "distilled head (head(x) + head_dist(x)) / 2": (0, 0, 0, 1),
}
#: What each twin keeps: (Conv, BN, Add, Gemm) after fusing.
KEPT = {
    "mixer with a ReLU between branches": (1, 1, 2, 0),  # conv+BN fold; the sub and add stay
    "mixer whose subtracted norm(x) is returned": (1, 1, 2, 0),  # conv+BN fold; norm(x) stays computed
    "padded branch with pad value 1": (2, 0, 1, 0),  # the chain after the pad merges; the sum (one Add) stays
    "head with a ReLU before the average": (0, 0, 1, 2),  # each BN folds into its Linear
}


def _fuse_both(name: str, table: dict, policy: str = "flops"):  # type: ignore[no-untyped-def]
    module, x = table[name]()
    with torch.no_grad():
        ref = module(x)
    fused_torch, t_report = convfuse.fuse(module, policy=policy, example_inputs=x, return_report=True)
    with torch.no_grad():
        out = fused_torch(x)
    for a, b in zip(ref if isinstance(ref, tuple) else [ref], out if isinstance(out, tuple) else [out]):
        assert rel_err(a, b) <= 1e-5
    original = export(module, x)
    fused_onnx, o_report = convfuse.fuse_onnx(original, policy=policy)
    assert rel_err(ref if not isinstance(ref, tuple) else ref[0], _run(fused_onnx, x)) <= 1e-5
    return counts(original), counts(export(fused_torch, x)), counts(fused_onnx), t_report, o_report


def _groups(c: dict) -> tuple[int, ...]:
    return tuple(c[k] for k in ("Conv", "BN", "Add", "Gemm"))


@pytest.mark.parametrize("name", list(DEPLOY))
def test_block_collapses_to_its_deploy_form_in_both_front_ends(name: str) -> None:
    before, via_torch, via_onnx, t_report, o_report = _fuse_both(name, BLOCKS)
    assert _groups(via_torch) == _groups(via_onnx) == DEPLOY[name]
    assert via_torch["params"] == via_onnx["params"] < before["params"]
    for report in (t_report, o_report):
        delta = sum(m.after.params - m.before.params for m in report.merges)
        assert delta == report.after.params - report.before.params  # lines add up to the summary


@pytest.mark.parametrize("name", list(KEPT))
def test_twin_keeps_what_is_not_exact(name: str) -> None:
    _, via_torch, via_onnx, _, _ = _fuse_both(name, TWINS, policy="always")
    assert _groups(via_torch) == _groups(via_onnx) == KEPT[name]


def test_twin_reasons() -> None:
    *_, t_report, o_report = _fuse_both("mixer whose subtracted norm(x) is returned", TWINS)
    for report in (t_report, o_report):
        assert Reason.GRAPH_OUTPUT in {d.reason for d in report.declines}
    *_, t_report, o_report = _fuse_both("padded branch with pad value 1", TWINS)
    for report in (t_report, o_report):
        assert Reason.UNSUPPORTED in {d.reason for d in report.declines}


def test_the_planners_old_disagreements_now_agree() -> None:
    # The expansion chain splits where MACs are lowest (no 5x5); depthwise branches merge apart
    # from the dense one; 1x1 -> AvgPool -> 1x1 is not merged under flops (parameters would rise).
    expect = {
        "1x1 8->64, 1x1 64->8, 3x3 8->4, 3x3 4->8": (2, 0, 0, 0),
        "depthwise 3x3 + depthwise 1x1 + dense 1x1": (2, 0, 1, 0),
        "1x1 -> AvgPool -> 1x1": (2, 0, 0, 0),
        "one conv called twice (shared weights)": (3, 1, 0, 0),
    }
    for name, groups in expect.items():
        before, via_torch, via_onnx, t_report, _ = _fuse_both(name, CASES)
        assert _groups(via_torch) == _groups(via_onnx) == groups, name
        assert via_torch["params"] == via_onnx["params"] <= before["params"], name
        assert via_torch["MACs"] == via_onnx["MACs"] <= before["MACs"], name
    *_, t_report, _ = _fuse_both("1x1 -> AvgPool -> 1x1", CASES, policy="always")
    assert len(t_report.merges) == 1  # exact, so 'always' merges it


def test_long_chain_plans_quickly_in_torch() -> None:
    """60 conv/BN layers under 'always': every conv keeps its BN; padded convs do not compose."""
    with border_merges(False):  # case 1 alone: padded convs after a BN decline
        _, via_torch, via_onnx, t_report, _ = _fuse_both("60-layer conv/BN chain", CASES, policy="always")
    assert _groups(via_torch) == _groups(via_onnx) == (30, 0, 0, 0)
    padding = {Reason.PADDED_AFTER_SPATIAL, Reason.PADDED_AFTER_BIASED_POINTWISE}
    assert padding & {d.reason for d in t_report.declines}
    _, via_torch, via_onnx, t_report, _ = _fuse_both("60-layer conv/BN chain", CASES, policy="always")
    assert _groups(via_torch)[0] == _groups(via_onnx)[0] == 30  # issue 14: a BN may join either side
