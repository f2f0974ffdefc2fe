"""Property tests of the one planner: random linear regions built as torch modules and exported
to ONNX, fused by both front ends under both policies.

Each example is a net of three regions between ReLUs (2-4 branches of one input: 'same' convs,
explicit zero pad + valid conv, identity, average pooling, BN; each maybe followed by 1x1
convs or BN; combined with ``+``, ``-``, scalar and per-channel scales, or concatenated and
mixed by a 1x1 conv or BN; 1D/2D/3D), or a Linear head (BN1d before/after, heads averaged).
Checked: outputs equal (fp32 1e-5; the torch front end in fp64 1e-9), under ``always`` each
region is one layer, under ``flops`` neither front end raises MACs or parameters, the two front
ends write the same ops and parameters, and a report's merge lines add up to its summary.
Regions per run: 170 nets x 3 + 40 heads = 550.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter

import onnx
import onnxruntime as ort
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import convfuse
from benchmarks.region_blocks import randomize
from convfuse.frontends.onnx.stats import model_stats
from tests.support.helpers import rel_err
from tests.support.region_models import HeadNet, RegionNet, heads, regions

NETS = int(os.environ.get("NETS", 170))  # nets of 3 regions per run
HEADS = 40
_SPATIAL = {1: (7,), 2: (5, 5), 3: (4, 4, 3)}
_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None)
if os.environ.get("NOSHRINK"):  # report the first failing example at once (debugging)
    _SETTINGS["phases"] = [Phase.generate]


def _export(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buf, opset_version=17, dynamo=False, do_constant_folding=False)
    return onnx.load_from_string(buf.getvalue())


def _run(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node if n.op_type not in ("Constant", "Relu"))


def _adds_up(report: convfuse.report.Report) -> None:
    """The per-merge parameter changes add up to the summary's."""
    delta = sum(m.after.params - m.before.params for m in report.merges)
    assert delta == report.after.params - report.before.params, report


def _plan(report: convfuse.report.Report) -> list[tuple[str, int, int]]:
    """A report's merges as the front ends share them: kind and cost after (names differ).
    Constant folding of the export's shape arithmetic (ONNX pre-pass) is not part of the plan."""
    fold = convfuse.report.MergeKind.FOLD
    return sorted((m.group.value, m.after.macs, m.after.params) for m in report.merges if m.group is not fold)


def _check(
    module: nn.Module, x: torch.Tensor, layers: int, shapes: bool = False, export_fused: bool = False
) -> None:
    """Both front ends and both policies on ``module``; ``layers``: its regions. ``shapes``:
    give the torch front end the example input (it needs it for BatchNorm1d next to Linear)."""
    with torch.no_grad():
        ref = module(x)
    original = _export(module, x)
    stats = model_stats(original)
    for policy in ("flops", "always"):
        fused_torch, t_report = convfuse.fuse(
            module, policy=policy, example_inputs=x if shapes else None, return_report=True
        )
        with torch.no_grad():
            assert rel_err(ref, fused_torch(x)) <= 1e-5, t_report
        fused_onnx, o_report = convfuse.fuse_onnx(original, policy=policy)
        assert rel_err(ref, _run(fused_onnx, x)) <= 1e-5, o_report
        assert _plan(t_report) == _plan(o_report), (t_report, o_report)  # the same plan
        if export_fused:  # and the same graph
            via_torch = _export(fused_torch, x)
            assert (
                _ops(via_torch) == _ops(fused_onnx)
                and model_stats(via_torch).params == model_stats(fused_onnx).params
            )
        _adds_up(o_report)
        _adds_up(t_report)
        if policy == "flops":  # MACs of every layer merged (pools and BNs too), and parameters
            assert all(m.after <= m.before for m in [*t_report.merges, *o_report.merges])
            assert model_stats(fused_onnx).params <= stats.params
            assert t_report.after.params <= t_report.before.params
        else:
            computing = {op: n for op, n in _ops(fused_onnx).items() if op not in ("Identity",)}
            assert sum(computing.values()) == layers, o_report


@settings(max_examples=NETS, **_SETTINGS)
@given(
    rs=st.lists(regions(), min_size=3, max_size=3),
    ndim=st.sampled_from([1, 2, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_random_regions_fuse_alike_in_both_front_ends(rs: list, ndim: int, seed: int) -> None:
    torch.manual_seed(seed)
    module = randomize(RegionNet(rs, 3, ndim), seed)
    x = torch.randn(2, 3, *_SPATIAL[ndim])
    _check(module, x, layers=3, export_fused=seed % 8 == 1)
    if seed % 8 == 0:  # fp64: the merge is exact, not close
        double = module.double()
        fused = convfuse.fuse(double, policy="always", example_inputs=x.double())
        with torch.no_grad():
            assert rel_err(double(x.double()), fused(x.double())) <= 1e-9


@settings(max_examples=HEADS, **_SETTINGS)
@given(h=heads, seed=st.integers(0, 2**16))
def test_random_linear_heads_fuse_alike_in_both_front_ends(h, seed: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    module = randomize(HeadNet(h, 6, 4), seed)
    _check(module, torch.randn(5, 6), layers=1, shapes=True, export_fused=seed % 4 == 0)
