"""The latency policy: decisions from injected timings (both front ends), budget, cache, devices,
the timing models themselves, and one real-timing smoke test."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import convfuse
from convfuse import Reason
from convfuse import latency as latency_module
from convfuse.algebra import ChannelAffine, add, affine_conv, compose_chain, identity
from convfuse.errors import DeviceUnavailableError
from convfuse.latency import Candidate, LatencyMeter, Parallel, Timing, build_models
from convfuse.policy import Judge, judge_latency
from convfuse.report import Report
from convfuse.spec import ConvSpec
from convfuse_cli.main import main
from tests.support._torch_models import RepVGGBlock, count_convs, rand_bn, rel_error
from tests.support.onnx_builders import Graph, check_fused, ops, reasons

FAST = Timing(2e-3, 1e-3)  # the merged conv takes half the time
SLOW = Timing(1e-3, 2e-3)  # the merged conv takes twice the time


class FakeTimer:
    """A timer that answers from a rule and records every candidate it was asked about."""

    def __init__(self, answer: Timing | Callable[[Candidate], Timing]) -> None:
        self.answer = answer
        self.calls: list[Candidate] = []

    def __call__(self, candidate: Candidate) -> Timing:
        self.calls.append(candidate)
        return self.answer(candidate) if callable(self.answer) else self.answer


def _fuse_onnx(model: onnx.ModelProto, timer: FakeTimer, **kw) -> tuple[onnx.ModelProto, Report]:
    fused, report = convfuse.fuse_onnx(model, policy="latency", timer=timer, **kw)
    check_fused(model, fused)
    return fused, report


def _fuse_torch(model: nn.Module, x: torch.Tensor, timer: FakeTimer, **kw) -> tuple[nn.Module, Report]:
    model.eval()
    fused, report = convfuse.fuse(model, policy="latency", return_report=True, timer=timer, **kw)
    with torch.no_grad():
        assert rel_error(model(x), fused(x)) <= 1e-5
    return fused, report


# --------------------------------------------------------------------------- models
def _chain_model(shape: list[int | str] | None = None) -> onnx.ModelProto:
    """conv 3x3 (padded) -> conv 1x1: the flops rule merges it."""
    g = Graph(shape or [1, 8, 10, 10])
    y = g.conv("x", 8, 8, 3, pads=[1, 1, 1, 1])
    return g.model([g.conv(y, 8, 8, 1)])


def _dw_pw_model() -> onnx.ModelProto:
    """depthwise 3x3 -> pointwise 1x1: the flops rule keeps it apart."""
    g = Graph([1, 8, 10, 10])
    y = g.conv("x", 8, 8, 3, group=8, pads=[1, 1, 1, 1], bias=False)
    return g.model([g.conv(y, 8, 16, 1)])


def _repvgg_model() -> onnx.ModelProto:
    """3x3 conv+BN + 1x1 conv+BN + BN identity, summed: a sum of three branches of x."""
    g = Graph([1, 8, 10, 10])
    a = g.bn(g.conv("x", 8, 8, 3, pads=[1, 1, 1, 1], bias=False), 8)
    b = g.bn(g.conv("x", 8, 8, 1, bias=False), 8)
    c = g.bn("x", 8)
    return g.model([g.node("Relu", [g.node("Add", [g.node("Add", [a, b]), c])])])


# --------------------------------------------------------------------------- ONNX decisions
def test_onnx_chain_merged_when_measured_faster() -> None:
    timer = FakeTimer(FAST)
    fused, report = _fuse_onnx(_chain_model(), timer)
    assert ops(fused)["Conv"] == 1 and not report.declines
    assert report.merges[0].latency == (FAST.original, FAST.merged)
    assert "latency 2 ms -> 1 ms" in report.merges[0].line()
    assert json.loads(report.to_json())["merges"][0]["latency_ms"] == {"before": 2.0, "after": 1.0}
    # The timer saw the layers as they stand and the model's static input shape.
    assert timer.calls[0].input_shape == (1, 8, 10, 10)
    assert [s.kernel_size for s in timer.calls[0].original] == [(3, 3), (1, 1)]


def test_onnx_chain_kept_when_measured_slower() -> None:
    fused, report = _fuse_onnx(_chain_model(), FakeTimer(SLOW))
    assert ops(fused)["Conv"] == 2 and not report.merges
    assert reasons(report) == {Reason.NOT_PROFITABLE}
    message = report.declines[0].decline.message
    assert "2 ms" in message and "1 ms" in message and "measured" in message
    # The flops rule would have merged it.
    fused, report = convfuse.fuse_onnx(_chain_model())
    assert ops(fused)["Conv"] == 1


def test_onnx_depthwise_pointwise_merges_when_measured_faster() -> None:
    """The point of the policy: a merge the flops rule refuses is taken when it runs faster."""
    model = _dw_pw_model()
    fused, report = convfuse.fuse_onnx(model)
    assert ops(fused)["Conv"] == 2 and reasons(report) == {Reason.NOT_PROFITABLE}
    fused, report = _fuse_onnx(model, FakeTimer(FAST))
    assert ops(fused)["Conv"] == 1 and report.merges[0].after.macs > report.merges[0].before.macs
    fused, report = _fuse_onnx(model, FakeTimer(SLOW))
    assert ops(fused)["Conv"] == 2 and reasons(report) == {Reason.NOT_PROFITABLE}


def test_onnx_sum_decided_by_timing() -> None:
    model = _repvgg_model()
    timer = FakeTimer(FAST)
    fused, report = _fuse_onnx(model, timer)
    assert ops(fused) == {"Conv": 1, "Relu": 1}
    assert report.merges[-1].kind == "sum" and report.merges[-1].latency == tuple(FAST)
    sums = [c for c in timer.calls if isinstance(c.original[0], Parallel)]
    assert sums and len(sums[0].original[0].branches) == 3
    bn_branch = [b for b in sums[0].original[0].branches if len(b) == 1 and b[0].groups == 8]
    assert bn_branch and bn_branch[0][0].is_pointwise  # the BN identity branch, a per-channel affine
    fused, report = _fuse_onnx(model, FakeTimer(SLOW))
    assert ops(fused) == ops(model) and not report.merges  # the conv+BN pairs measured slower too
    assert reasons(report) == {Reason.NOT_PROFITABLE}


def test_latency_merges_stay_exact() -> None:
    """Negative twin: a timer that calls every merge faster does not make an inexact one."""
    g = Graph([1, 4, 10, 10])
    y = g.conv("x", 4, 4, 3)
    model = g.model([g.conv(y, 4, 4, 3, pads=[1, 1, 1, 1])])
    fused, report = _fuse_onnx(model, FakeTimer(FAST))
    assert ops(fused)["Conv"] == 2 and reasons(report) == {Reason.PADDED_AFTER_SPATIAL}


def test_huge_merges_are_declined_without_timing() -> None:
    g = Graph([1, 64, 12, 12])
    y = g.conv("x", 64, 64, 9, group=64, bias=False)
    model = g.model([g.conv(y, 64, 64, 1)])
    timer = FakeTimer(FAST)
    fused, report = _fuse_onnx(model, timer)
    assert ops(fused)["Conv"] == 2 and not timer.calls
    assert reasons(report) == {Reason.NOT_PROFITABLE} and "not timed" in report.declines[0].decline.message


def test_symbolic_dims_are_timed_on_documented_defaults() -> None:
    timer = FakeTimer(FAST)
    _, report = _fuse_onnx(_chain_model(["N", 8, "H", "W"]), timer)
    assert timer.calls[0].input_shape == (1, 8, 56, 56)
    text = "\n".join(report.notes)
    assert "timed at batch 1" in text and "default spatial size" in text


def test_identical_blocks_are_timed_once_and_output_is_deterministic() -> None:
    g = Graph([1, 8, 10, 10])
    y = "x"
    for _ in range(3):
        y = g.node("Relu", [g.conv(g.conv(y, 8, 8, 3, pads=[1, 1, 1, 1]), 8, 8, 1)])
    model = g.model([y])
    timer = FakeTimer(FAST)
    first, report = _fuse_onnx(model, timer)
    assert ops(first)["Conv"] == 3 and len(report.merges) == 3
    keys = [c.key() for c in timer.calls]
    assert len(keys) == len(set(keys)) == 1  # three blocks, one geometry: one timing
    again, _ = _fuse_onnx(model, FakeTimer(FAST))
    assert again.SerializeToString() == first.SerializeToString()


# --------------------------------------------------------------------------- budget, meter, judge
def test_spent_budget_falls_back_to_flops_with_a_note() -> None:
    timer = FakeTimer(SLOW)  # would keep everything apart, were it asked
    fused, report = _fuse_onnx(_chain_model(), timer, latency_budget=0)
    assert not timer.calls
    assert ops(fused)["Conv"] == 1  # the flops rule merges it
    assert "judged by the flops rule" in report.merges[0].note and report.merges[0].latency is None
    assert any("budget of 0 s spent" in n for n in report.notes)
    # Negative twin: the flops rule still declines what it declines.
    fused, report = _fuse_onnx(_dw_pw_model(), timer, latency_budget=0)
    assert ops(fused)["Conv"] == 2 and reasons(report) == {Reason.NOT_PROFITABLE}
    assert "budget" in report.declines[0].decline.message


def _spec(co: int, ci: int, k: int, **kw) -> ConvSpec:
    return ConvSpec(weight=torch.randn(co, ci, k, k, dtype=torch.float64), **kw)


def test_meter_budget_counts_timing_and_cache_still_answers() -> None:
    now = [0.0]

    def timer(candidate: Candidate) -> Timing:
        now[0] += 0.6
        return FAST

    meter = LatencyMeter(budget=1.0, timer=timer, clock=lambda: now[0])
    cands = [Candidate((_spec(4, 4, k),), _spec(4, 4, k), (1, 4, 8, 8)) for k in (1, 3, 5)]
    assert meter.measure(cands[0]) == FAST and meter.measure(cands[1]) == FAST
    assert isinstance(meter.measure(cands[2]), str)  # 1.2 s spent of 1 s
    assert meter.measure(cands[0]) == FAST  # a cached answer costs nothing
    assert (meter.timed, meter.reused, meter.over_budget) == (2, 1, 1)


def test_judge_latency_margin() -> None:
    assert judge_latency(Timing(1.0, 1.04), 0.05) is None
    refused = judge_latency(Timing(1.0, 1.06), 0.05)
    assert refused is not None and refused.reason is Reason.NOT_PROFITABLE
    assert judge_latency(Timing(1.0, 1.0), 0.0) is None and judge_latency(Timing(1.0, 1.01), 0.0) is not None


def test_flops_and_always_judges_never_time() -> None:
    for policy in ("flops", "always"):
        assert not Judge(policy).times and Judge(policy).notes() == []


# --------------------------------------------------------------------------- devices
def test_cuda_absent_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency_module, "cuda_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        convfuse.fuse_onnx(_chain_model(), policy="latency", device="cuda")
    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        convfuse.fuse(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)), policy="latency", device="cuda")


def test_cli_cuda_absent_exits_2_with_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency_module, "cuda_available", lambda: False)
    path = tmp_path / "m.onnx"
    onnx.save_model(_chain_model(), path)
    for command in ("merge", "inspect"):
        result = CliRunner().invoke(main, [command, str(path), "--policy", "latency", "--device", "cuda"])
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convfuse: error:") and "CUDA" in lines[0]
    assert not (tmp_path / "m.fused.onnx").exists()


# --------------------------------------------------------------------------- torch decisions
def test_torch_chain_decided_by_timing() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1))
    x = torch.randn(2, 8, 12, 12)
    timer = FakeTimer(FAST)
    fused, report = _fuse_torch(model, x, timer, example_inputs=x)
    assert count_convs(fused) == 1 and report.merges[0].latency == tuple(FAST)
    assert timer.calls[0].input_shape == (2, 8, 12, 12)  # from example_inputs
    fused, report = _fuse_torch(model, x, FakeTimer(SLOW))
    assert count_convs(fused) == 2 and _torch_reasons(report) == {Reason.NOT_PROFITABLE}
    assert "2 ms" in report.declines[0].decline.message


def test_torch_depthwise_pointwise_merges_when_measured_faster() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1))
    x = torch.randn(2, 8, 7, 7)
    timer = FakeTimer(FAST)
    fused, _ = _fuse_torch(model, x, timer)
    assert count_convs(fused) == 1
    assert timer.calls[0].input_shape == (1, 8, 56, 56)  # no example inputs: the defaults
    fused, report = _fuse_torch(model, x, FakeTimer(SLOW))
    assert count_convs(fused) == 2 and _torch_reasons(report) == {Reason.NOT_PROFITABLE}


def test_torch_sum_block_decided_by_timing() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 8, 9, 9)
    timer = FakeTimer(FAST)
    fused, report = _fuse_torch(RepVGGBlock(8, 8), x, timer, example_inputs=x)
    assert count_convs(fused) == 1 and any(m.kind == "sum" and m.latency for m in report.merges)
    assert any(isinstance(c.original[0], Parallel) and c.input_shape == (2, 8, 9, 9) for c in timer.calls)
    fused, report = _fuse_torch(RepVGGBlock(8, 8), x, FakeTimer(SLOW))
    assert count_convs(fused) == 2  # each conv+BN is timed too, and kept apart
    assert Reason.NOT_PROFITABLE in _torch_reasons(report)


def test_torch_nested_sequential_gets_recorded_shapes() -> None:
    torch.manual_seed(4)
    inner = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), rand_bn(8))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), inner)
    x = torch.randn(2, 3, 17, 17)
    timer = FakeTimer(FAST)
    fused, _ = _fuse_torch(model, x, timer, example_inputs=x)
    assert count_convs(fused) == 2
    assert [c.input_shape for c in timer.calls] == [(2, 8, 8, 8)]


def _torch_reasons(report: Report) -> set[Reason]:
    return {d.reason for d in report.declines}


# --------------------------------------------------------------------------- timing models
def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _affine(c: int) -> ConvSpec:
    scale, shift = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    return affine_conv(ChannelAffine(scale, shift), 2)


def _check_models(candidate: Candidate) -> None:
    original, merged = build_models(candidate)
    for model in (original, merged):
        onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal([int(d) for d in candidate.input_shape]).astype(np.float32)
    a, b = _run(original, x), _run(merged, x)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4 * float(np.abs(a).max())


def test_timing_models_compute_the_same_function() -> None:
    """With real weights, the original-layers model and the merged-conv model agree: the builder
    writes convs, affines (Mul/Add), zero pads and sums with an identity branch faithfully."""
    torch.manual_seed(5)
    pad = identity(8, 2, torch.float64).replace(pads=((1, 1), (1, 1)))
    conv3 = _spec(8, 8, 3, bias=torch.randn(8, dtype=torch.float64))
    chain = (pad, conv3, _affine(8))
    merged = compose_chain(list(chain))
    assert isinstance(merged, ConvSpec)
    _check_models(Candidate(chain, merged, (1, 8, 10, 10)))
    # Strided and dilated, then a pointwise conv with no bias.
    chain2 = (_spec(8, 4, 3, stride=(2, 2), dilation=(1, 2), groups=2), _spec(6, 8, 1))
    merged2 = compose_chain(list(chain2))
    assert isinstance(merged2, ConvSpec)
    _check_models(Candidate(chain2, merged2, (2, 8, 11, 13)))
    branches = (
        (conv3.replace(pads=((1, 1), (1, 1))), _affine(8)),
        (_spec(8, 8, 1), _affine(8)),
        (_affine(8),),
        (),
    )
    folded = [
        compose_chain(list(b)) if len(b) > 1 else b[0] if b else identity(8, 2, torch.float64)
        for b in branches
    ]
    merged3 = add(folded)
    assert isinstance(merged3, ConvSpec)
    _check_models(Candidate((Parallel(branches),), merged3, (1, 8, 9, 9)))


def test_timing_key_ignores_values_but_not_kinds() -> None:
    a = Candidate((_spec(8, 8, 3),), _spec(8, 8, 3), (1, 8, 9, 9))
    b = Candidate((_spec(8, 8, 3),), _spec(8, 8, 3), (1, 8, 9, 9))
    assert a.key() == b.key()
    assert (
        Candidate((_affine(8),), _affine(8), (1, 8, 9, 9)).key()
        != Candidate((identity(8, 2, torch.float64),), _affine(8), (1, 8, 9, 9)).key()
    )
    assert a.key() != Candidate((_spec(8, 8, 3),), _spec(8, 8, 3), (1, 8, 9, 10)).key()


# --------------------------------------------------------------------------- real timing
def test_real_timing_smoke() -> None:
    """ONNX Runtime timings on a tiny model, under a small budget: decisions made, numbers kept."""
    model = _repvgg_model()
    fused, report = convfuse.fuse_onnx(model, policy="latency", latency_budget=2.0)
    check_fused(model, fused)
    assert any(n.startswith("latency: timed") for n in report.notes)
    timed = [m for m in report.merges if m.latency is not None]
    assert timed and all(t > 0 for m in timed for t in m.latency)
    assert ops(fused)["Conv"] <= 3


def test_cli_latency_smoke(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(_chain_model(), path)
    result = CliRunner().invoke(
        main, ["inspect", str(path), "--policy", "latency", "--latency-budget", "1", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert any("latency: timed" in n for n in payload["notes"])
    assert all(m["latency_ms"] is None or m["latency_ms"]["after"] > 0 for m in payload["merges"])
    assert "latency: timed candidate" in result.stderr  # progress on stderr
