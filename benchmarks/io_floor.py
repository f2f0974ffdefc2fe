"""The ONNX path against the I/O floor: ``convfuse merge`` process against process with a bare
``onnx.load`` + ``onnx.save``, onnx-simplifier and onnxslim, wall time and peak memory.

Run from the repository root:  python -m benchmarks.io_floor [--reps 3] [--dir /tmp] [--profile]

Two models, built in code (fixed seed) in a temporary directory:

- ``big`` (~157 MB of float32 weights, 120 convs of 256 channels on a 256x8x8 input): 20 units
  ``Conv1x1 (no bias) -> Conv3x3 -> BN -> Relu`` (the 1x1 folds into the 3x3: a compose with a
  pointwise side), 20 units ``Conv3x3 -> BN -> Conv1x1 -> Relu`` (likewise) and 20 RepVGG
  blocks ``Conv3x3+BN + Conv1x1+BN + BN -> Add -> Relu`` (a sum of three branches);
- ``tiny`` (about 1 KB): ``Conv3x3 -> BN -> Relu -> Conv1x1 -> BN``: what start-up costs.

Every figure is one child process (peak resident memory from ``/usr/bin/time``), tools
interleaved in each repetition; the table shows the median wall time and the median peak. A
peer tool that is not installed is skipped with a printed line (they are not dependencies:
``pip install onnxsim onnxslim`` to include them). ``--profile`` adds a cProfile of one
``convfuse merge --no-verify`` of the big model (the 25 most expensive functions by own time).
Targets (issue 13): merge --no-verify at most 2x the wall time and 1.5x the peak memory of
load+save and faster than onnxslim on ``big``; ``tiny`` merged and verified in under 1 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_big", "build_tiny", "measure", "main"]

C = 256  # channels of every conv in the big model
SPATIAL = 8

_LOAD_SAVE = "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
_ONNXSIM = (
    "import onnx, onnxsim, sys; m, ok = onnxsim.simplify(onnx.load(sys.argv[1])); onnx.save(m, sys.argv[2])"
)
_ONNXSLIM = "import onnxslim, sys; onnxslim.slim(sys.argv[1], sys.argv[2])"


# --------------------------------------------------------------------------- models
class _Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, array: np.ndarray, prefix: str) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, bias: bool = True) -> str:
        w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) / np.float32(np.sqrt(cin * k * k))
        inputs = [x, self.const(w, "w")]
        if bias:
            inputs.append(self.const(self.rng.uniform(-0.1, 0.1, cout), "b"))
        y = self.name("conv")
        self.nodes.append(
            helper.make_node("Conv", inputs, [y], name=y, kernel_shape=[k, k], pads=[k // 2] * 4)
        )
        return y

    def bn(self, x: str, c: int) -> str:
        params = [
            self.const(self.rng.uniform(0.5, 1.5, c), "gamma"),
            self.const(self.rng.uniform(-0.5, 0.5, c), "beta"),
            self.const(self.rng.uniform(-0.5, 0.5, c), "mean"),
            self.const(self.rng.uniform(0.5, 2.0, c), "var"),
        ]
        y = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [x, *params], [y], name=y))
        return y

    def op(self, op: str, inputs: Sequence[str]) -> str:
        y = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [y], name=y))
        return y

    def save(self, x: str, y: str, cin: int, cout: int, spatial: int, path: Path) -> None:
        graph = helper.make_graph(
            self.nodes,
            "io_floor",
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, cin, spatial, spatial])],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, cout, spatial, spatial])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))


def build_big(path: Path, seed: int = 0) -> int:
    """Write the ~150 MB model (120 convs of 256 channels); return its size in bytes."""
    g = _Graph(seed)
    y = "x"
    for _ in range(20):
        y = g.op("Relu", [g.bn(g.conv(g.conv(y, C, C, 1, bias=False), C, C, 3), C)])
    for _ in range(20):
        y = g.op("Relu", [g.conv(g.bn(g.conv(y, C, C, 3), C), C, C, 1)])
    for _ in range(20):
        dense = g.bn(g.conv(y, C, C, 3), C)
        point = g.bn(g.conv(y, C, C, 1), C)
        y = g.op("Relu", [g.op("Add", [g.op("Add", [dense, point]), g.bn(y, C)])])
    g.save("x", y, C, C, SPATIAL, path)
    return path.stat().st_size


def build_tiny(path: Path, seed: int = 0) -> int:
    """Write the ~1 KB model; return its size in bytes."""
    g = _Graph(seed)
    y = g.bn(g.conv(g.op("Relu", [g.bn(g.conv("x", 3, 4, 3), 4)]), 4, 4, 1), 4)
    g.save("x", y, 3, 4, 8, path)
    return path.stat().st_size


# --------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class Run:
    wall: float  # seconds
    peak: int  # bytes of resident memory at the child's peak
    code: int


_TIME = shutil.which("time", path="/usr/bin:/bin")


def _child(argv: Sequence[str], scratch: Path) -> Run:
    """Run ``argv``; its wall time and peak resident memory.

    The peak comes from ``/usr/bin/time`` where present: a child forked from this (large)
    process would otherwise inherit its high-water mark on Linux; without it, ``os.wait4``.
    """
    report = scratch / "time.txt"
    full = [_TIME, "-f", "%M", "-o", str(report), *argv] if _TIME else list(argv)
    start = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if code:
        print(f"  ! {' '.join(argv[:4])} ... exited {code}: {err.strip()[-300:]}")
    peak = usage.ru_maxrss * 1024
    if _TIME:
        peak = int(report.read_text().split()[-1]) * 1024
    return Run(wall, peak, code)


def _convfuse(*args: str) -> list[str]:
    return [sys.executable, "-m", "convfuse_cli.main", *args]


def _tools(src: Path, out: Path, tiny: bool) -> dict[str, list[str]]:
    py = sys.executable
    tools = {
        "onnx load + save": [py, "-c", _LOAD_SAVE, str(src), str(out / "loadsave.onnx")],
        "convfuse merge --no-verify": _convfuse(
            "merge", str(src), "-o", str(out / "fused.onnx"), "--no-verify"
        ),
    }
    if tiny:
        tools["convfuse merge (verified)"] = _convfuse("merge", str(src), "-o", str(out / "fused-v.onnx"))
        tools["convfuse verify"] = _convfuse("verify", str(src), str(out / "fused.onnx"))
    for name, module, code in (("onnx-simplifier", "onnxsim", _ONNXSIM), ("onnxslim", "onnxslim", _ONNXSLIM)):
        if importlib.util.find_spec(module) is None:
            print(f"  (skipped {name}: `{module}` is not installed; pip install {module} to include it)")
            continue
        tools[name] = [py, "-c", code, str(src), str(out / f"{module}.onnx")]
    return tools


def measure(src: Path, out: Path, reps: int, tiny: bool) -> dict[str, list[Run]]:
    """Every tool on ``src``, ``reps`` times, interleaved (one warm-up pass first, not counted)."""
    tools = _tools(src, out, tiny)
    runs: dict[str, list[Run]] = {name: [] for name in tools}
    # Warm-up: the page cache holds the interpreter and the model; verify needs merge's output.
    _child(tools["convfuse merge --no-verify"], out)
    for _ in range(reps):
        for name, argv in tools.items():
            runs[name].append(_child(argv, out))
    return runs


def _table(title: str, runs: dict[str, list[Run]]) -> dict[str, tuple[float, float]]:
    medians = {
        name: (statistics.median(r.wall for r in rs), statistics.median(r.peak for r in rs))
        for name, rs in runs.items()
    }
    base_wall, base_peak = medians["onnx load + save"]
    print(f"\n### {title}\n")
    print("| tool | wall s | peak MiB | wall / load+save | peak / load+save | runs ok |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (wall, peak) in medians.items():
        ok = sum(r.code == 0 for r in runs[name])
        print(
            f"| {name} | {wall:.2f} | {peak / 2**20:.0f} | {wall / base_wall:.2f}x | {peak / base_peak:.2f}x "
            f"| {ok}/{len(runs[name])} |"
        )
    return medians


def _profile(src: Path, out: Path, limit: int = 25) -> None:
    """cProfile of one merge --no-verify in a child; print the top functions by own time."""
    prof = out / "merge.prof"
    argv = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "convfuse_cli.main",
            "merge", str(src), "-o", str(out / "fused-prof.onnx"), "--no-verify"]  # fmt: skip
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    text = io.StringIO()
    stats = pstats.Stats(str(prof), stream=text)
    print(f"\n### Profile: convfuse merge --no-verify of the big model (total {stats.total_tt:.2f} s)\n")
    stats.sort_stats("tottime").print_stats(limit)
    print("```")
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("\n".join(line for line in lines[start:] if line.strip()))
    print("```")


def _verdict(what: str, met: bool, detail: str) -> None:
    print(f"- {what}: {'met' if met else 'MISSED'} ({detail})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per tool (median reported)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to build the models (default: a temp dir)"
    )
    parser.add_argument("--profile", action="store_true", help="also profile one merge of the big model")
    parser.add_argument("--tiny-only", action="store_true", help="skip the big model (smoke run)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="convfuse-io-floor-", dir=args.dir))
    try:
        print(
            f"python {sys.version.split()[0]}, onnx {onnx.__version__}, numpy {np.__version__}, "
            f"{os.cpu_count()} CPUs"
        )
        results: dict[str, dict[str, tuple[float, float]]] = {}
        models = [("tiny", build_tiny)] if args.tiny_only else [("big", build_big), ("tiny", build_tiny)]
        for name, build in models:
            src = work / f"{name}.onnx"
            size = build(src)
            print(f"\nbuilt {name}: {size / 2**20:.1f} MiB ({size:,} bytes)")
            out = work / f"out-{name}"
            out.mkdir()
            runs = measure(src, out, args.reps, tiny=name == "tiny")
            results[name] = _table(f"{name} model ({size / 2**20:.1f} MiB), median of {args.reps}", runs)
        print("\n### Targets\n")
        if "big" in results:
            big = results["big"]
            base_wall, base_peak = big["onnx load + save"]
            wall, peak = big["convfuse merge --no-verify"]
            _verdict(
                "big: merge --no-verify wall <= 2x load+save",
                wall <= 2 * base_wall,
                f"{wall / base_wall:.2f}x",
            )
            _verdict(
                "big: merge --no-verify peak <= 1.5x load+save",
                peak <= 1.5 * base_peak,
                f"{peak / base_peak:.2f}x",
            )
            if "onnxslim" in big:
                slim = big["onnxslim"][0]
                _verdict(
                    "big: merge --no-verify faster than onnxslim",
                    wall < slim,
                    f"{wall:.2f} s vs {slim:.2f} s",
                )
        tiny = results["tiny"]
        verified = tiny["convfuse merge (verified)"][0]
        _verdict("tiny: merged and verified in under 1 s", verified < 1.0, f"{verified:.2f} s")
        if args.profile and "big" in results:
            _profile(work / "big.onnx", work / "out-big")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
