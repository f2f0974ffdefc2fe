"""Benchmark convfuse against the original graph, ONNX Runtime's optimizer, onnx-simplifier and onnxoptimizer.

Prints Markdown tables: ORT latency per variant (interleaved, median), node counts and MACs,
numeric agreement, torch eager latency, the merge pass's own time and memory, and the targets.

    python -m benchmarks.run            # full run (a few minutes on 2 cores)
    python -m benchmarks.run --quick    # smoke version: two tiny models, 1 thread, few repetitions
    python -m benchmarks.run --help
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from . import adapters, onnx_tools, passcost
from .models import MODELS, BenchModel
from .results import AA, PEERS, VARIANTS, VARIANTS_TIMED, ModelResult, Options, Results
from .tables import render
from .timing import background_load, interleaved

__all__ = ["main", "machine_info", "measure_large", "measure_model", "parse_args", "run"]


# --------------------------------------------------------------------------- machine
def machine_info() -> dict[str, str]:
    """CPU model, cores, and the versions of everything measured."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__}
    import onnxruntime

    versions["onnxruntime"] = onnxruntime.__version__
    for peer in PEERS:
        try:
            versions[peer] = str(getattr(__import__(peer), "__version__", "?"))
        except ImportError:
            versions[peer] = "not installed"
    import convfuse

    versions["convfuse"] = convfuse.__version__
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        done = subprocess.run(git, capture_output=True, text=True, cwd=Path(__file__).parent, check=True)
        rev = done.stdout.strip()
        versions["convfuse"] += f" ({rev})"
    except (OSError, subprocess.CalledProcessError):
        pass
    cores = f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable"
    return {"cpu": cpu, "cores": cores, **versions}


# --------------------------------------------------------------------------- helpers
def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _rel_err(ref: np.ndarray, out: np.ndarray) -> float:
    return float(np.max(np.abs(ref.astype(np.float64) - out)) / max(np.max(np.abs(ref)), 1e-30))


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _report_summary(result: ModelResult, report: Any) -> None:
    merges = getattr(report, "merges", None)
    declines = getattr(report, "declines", None)
    if merges is not None:
        result.merges = len(merges)
    for d in declines or []:
        reason = getattr(getattr(d, "reason", None), "value", str(getattr(d, "reason", "?")))
        result.declines[reason] = result.declines.get(reason, 0) + 1


# --------------------------------------------------------------------------- one model
def _variants(proto: onnx.ModelProto, opts: Options, result: ModelResult) -> dict[str, onnx.ModelProto]:
    """The ONNX model each ORT variant runs; a tool that fails is recorded in ``result.errors``."""
    models: dict[str, onnx.ModelProto] = {"original": proto, "ort": proto}
    makers: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {}
    if opts.peers:
        for peer, fn in (
            ("onnxsim", onnx_tools.run_onnxsim),
            ("onnxoptimizer", onnx_tools.run_onnxoptimizer),
        ):
            if onnx_tools.peer_available(peer):
                makers[peer] = fn

    def convfuse(m: onnx.ModelProto) -> onnx.ModelProto:
        fused, report = adapters.fuse_onnx(m)
        _report_summary(result, report)
        return fused

    makers["convfuse"] = convfuse
    for key, make in makers.items():
        try:
            models[key] = make(_copy(proto))
        except Exception as exc:  # a peer or convfuse failing is a finding to report, not a crash
            result.errors[key] = _short(exc)
            if not isinstance(exc, adapters.FrontEndUnavailable):
                traceback.print_exc()
    if "convfuse" in models:
        models["convfuse+ort"] = models["convfuse"]
    models[AA] = proto
    return models


def _measure_graphs(models: dict[str, onnx.ModelProto], result: ModelResult) -> None:
    for key, model in models.items():
        if key == AA:
            continue
        level = VARIANTS[key][1]
        try:
            graph = onnx_tools.ort_optimized_graph(model) if level == "all" else model
            result.counts[key] = dict(onnx_tools.count_ops(graph), all=onnx_tools.count_all(graph))
            result.macs[key] = onnx_tools.macs(model) if level == "disabled" else None
        except Exception as exc:
            result.errors[key] = _short(exc)


def _measure_ort(
    models: dict[str, onnx.ModelProto], x: np.ndarray, opts: Options, result: ModelResult
) -> None:
    """Numeric agreement with the original, then interleaved latency per thread count."""
    blobs = {k: m.SerializeToString() for k, m in models.items()}
    for threads in opts.threads:
        sessions = {}
        for key, blob in blobs.items():
            if key in result.errors:
                continue
            try:
                sessions[key] = onnx_tools.ort_session(blob, VARIANTS_TIMED[key][1], threads)
            except Exception as exc:
                result.errors[key] = _short(exc)
        if "original" not in sessions:
            return
        if threads == opts.threads[0]:
            ref = onnx_tools.run_session(sessions["original"], x)
            for key, sess in list(sessions.items()):
                try:
                    out = onnx_tools.run_session(sess, x)
                    if key != AA:
                        result.rel_err[key] = _rel_err(ref, out) if out.shape == ref.shape else math.inf
                except Exception as exc:
                    result.errors[key] = _short(exc)
                    del sessions[key]
        calls = {k: (lambda s=s: onnx_tools.run_session(s, x)) for k, s in sessions.items()}
        result.ort[threads] = interleaved(calls, opts.reps, opts.sample_s)
        del sessions


def _measure_torch(module: torch.nn.Module, x: np.ndarray, opts: Options, result: ModelResult) -> None:
    try:
        fused = adapters.fuse_torch(module)
    except Exception as exc:
        result.errors["torch"] = _short(exc)
        if not isinstance(exc, adapters.FrontEndUnavailable):
            traceback.print_exc()
        return
    xt = torch.from_numpy(x)
    twin = copy.deepcopy(module)
    previous = torch.get_num_threads()
    try:
        with torch.inference_mode():
            ref, out = module(xt), fused(xt)
            result.eager_rel_err = _rel_err(ref.numpy(), out.numpy())
            for threads in opts.threads:
                torch.set_num_threads(threads)
                calls = {"original": lambda: module(xt), "convfuse": lambda: fused(xt), AA: lambda: twin(xt)}
                result.eager[threads] = interleaved(calls, opts.reps, opts.sample_s)
    finally:
        torch.set_num_threads(previous)


def _measure_pass_in_process(path: Path, workdir: Path, opts: Options, result: ModelResult) -> None:
    """File-to-file wall time of each tool on a small model, interleaved in this process."""
    tools: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {"roundtrip": lambda m: m}
    if "convfuse" not in result.errors:
        tools["convfuse"] = lambda m: adapters.fuse_onnx(m)[0]
    if "onnxsim" in result.counts:
        tools["onnxsim"] = onnx_tools.run_onnxsim
    if "onnxoptimizer" in result.counts:
        tools["onnxoptimizer"] = onnx_tools.run_onnxoptimizer
    out = workdir / f"{path.stem}.pass.onnx"

    def file_to_file(fn: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Callable[[], None]:
        return lambda: onnx.save(fn(onnx.load(str(path))), str(out))

    calls = {k: file_to_file(fn) for k, fn in tools.items()}
    timings = interleaved(calls, opts.pass_reps, sample_s=0.0, warmup=1)
    result.passes = {k: passcost.PassCost(k, t.median, 0, t.reps, False) for k, t in timings.items()}


def measure_model(bench: BenchModel, opts: Options, workdir: Path) -> ModelResult:
    """Export ``bench`` in train form and measure every variant of it."""
    t0 = time.perf_counter()
    module = bench.build()
    path = workdir / f"{bench.name}.onnx"
    proto = onnx_tools.export_train_form(module, bench.input_shape, path)
    result = ModelResult(bench.name, bench.family, bench.description, path.stat().st_size)
    x = torch.randn(bench.input_shape, generator=torch.Generator().manual_seed(1)).numpy()
    models = _variants(proto, opts, result)
    _measure_graphs(models, result)
    with background_load() as load:
        _measure_ort(models, x, opts, result)
        if opts.torch:
            _measure_torch(module, x, opts, result)
    result.background = load[0] if load else None
    _measure_pass_in_process(path, workdir, opts, result)
    _log(f"  {bench.name}: {time.perf_counter() - t0:.1f} s")
    return result


def measure_large(bench: BenchModel, opts: Options, workdir: Path) -> ModelResult:
    """Pass time and peak memory only, each run in a fresh subprocess."""
    t0 = time.perf_counter()
    path = workdir / f"{bench.name}.onnx"
    proto = onnx_tools.export_train_form(bench.build(), bench.input_shape, path)
    result = ModelResult(
        bench.name, bench.family, bench.description, path.stat().st_size, pass_in_process=False
    )
    result.counts["original"] = dict(onnx_tools.count_ops(proto))
    del proto
    tools = ["roundtrip", "convfuse"] + [p for p in PEERS if opts.peers and onnx_tools.peer_available(p)]
    result.passes = passcost.measure(tools, path, workdir, opts.pass_reps)
    for tool, cost in result.passes.items():
        if cost.error:
            result.errors[tool] = cost.error
    _log(f"  {bench.name}: {time.perf_counter() - t0:.1f} s")
    return result


# --------------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Command-line options; ``--quick`` picks a short smoke configuration."""
    latency_models = [n for n, m in MODELS.items() if m.latency]
    large_models = [n for n, m in MODELS.items() if not m.latency]
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: expandnet-s and repvgg, 1 thread, 3 reps, no large model",
    )
    p.add_argument("--models", help=f"comma-separated subset of: {', '.join(latency_models)}")
    p.add_argument("--threads", help="comma-separated intra-op thread counts (default 1,2; quick 1)")
    p.add_argument("--reps", type=int, help="latency repetitions per variant (default 21; quick 3)")
    p.add_argument("--pass-reps", type=int, help="pass-cost repetitions (default 5; quick 1)")
    p.add_argument(
        "--large",
        help="large models for pass time and memory only, comma-separated, or 'none' "
        f"(default {','.join(large_models)}; quick none)",
    )
    p.add_argument("--no-peers", action="store_true", help="skip onnxsim and onnxoptimizer")
    p.add_argument("--no-torch", action="store_true", help="skip torch eager timing")
    p.add_argument("--workdir", type=Path, help="keep exported models here (default: a temporary directory)")
    p.add_argument("-o", "--output", type=Path, help="also write the Markdown report to this file")
    a = p.parse_args(argv)
    models = a.models.split(",") if a.models else (["expandnet-s", "repvgg"] if a.quick else latency_models)
    large = a.large or ("none" if a.quick else ",".join(large_models))
    cores = len(os.sched_getaffinity(0))
    threads = [int(t) for t in (a.threads or ("1" if a.quick else "1,2")).split(",")]
    for name in models + ([] if large == "none" else large.split(",")):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return Options(
        models=models,
        threads=[t for t in threads if t <= cores] or [1],
        reps=a.reps or (3 if a.quick else 21),
        pass_reps=a.pass_reps or (1 if a.quick else 5),
        large=[] if large == "none" else large.split(","),
        peers=not a.no_peers,
        torch=not a.no_torch,
        sample_s=0.005 if a.quick else 0.01,
        workdir=a.workdir,
        output=a.output,
    )


def run(opts: Options) -> Results:
    """Measure everything ``opts`` asks for and render the Markdown."""
    res = Results(opts, machine_info(), [], cores=len(os.sched_getaffinity(0)))
    start_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="convfuse-bench-") as tmp:
        workdir = opts.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in opts.models:
            _log(f"measuring {name} ...")
            res.models.append(measure_model(MODELS[name], opts, workdir))
        for name in opts.large:
            _log(f"measuring pass cost of {name} ...")
            res.models.append(measure_large(MODELS[name], opts, workdir))
    res.load = (start_load, os.getloadavg()[0])
    res.markdown = render(res)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the Markdown, and exit non-zero if any variant could not be measured."""
    opts = parse_args(argv)
    res = run(opts)
    print(res.markdown)
    if opts.output:
        opts.output.write_text(res.markdown)
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
