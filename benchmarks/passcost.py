"""Wall time and peak memory of one file-to-file pass, measured in a fresh subprocess.

Every tool is timed the same way: ``onnx.load(in)``, the tool's transform, ``onnx.save(out)``. The
``roundtrip`` tool has no transform, so its time is the floor any pass pays. Memory is the peak
resident set (``VmHWM``) during that region minus the resident set just before it, with all the
tool's imports done first; the kernel's peak counter is reset before the region where Linux
allows it (``/proc/self/clear_refs``), else the import-time peak could hide the pass's.

Worker:  python -m benchmarks.passcost TOOL IN.onnx OUT.onnx   (prints one JSON line)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

__all__ = ["PASS_TOOLS", "PassCost", "measure", "run_worker"]

#: Tools measured by the worker, in the order they are run each repetition.
PASS_TOOLS = ("roundtrip", "convfuse", "onnxsim", "onnxoptimizer")

_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PassCost:
    """Median wall seconds over the repetitions and the largest peak memory increase (bytes)."""

    tool: str
    seconds: float
    peak_bytes: int
    runs: int
    peak_reset: bool  # the kernel's peak counter was reset before the timed region
    error: str = ""


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _transform(tool: str) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    """Import everything ``tool`` needs now (outside the measured region) and return its transform."""
    if tool == "roundtrip":
        return lambda m: m
    if tool == "convfuse":
        from benchmarks import adapters

        adapters._entry("fuse_onnx", "ONNX front end")  # fail before measuring; imports the front end
        return lambda m: adapters.fuse_onnx(m)[0]
    if tool == "onnxsim":
        import onnxsim  # noqa: F401

        from benchmarks.onnx_tools import run_onnxsim

        return run_onnxsim
    if tool == "onnxoptimizer":
        import onnxoptimizer  # noqa: F401

        from benchmarks.onnx_tools import run_onnxoptimizer

        return run_onnxoptimizer
    raise ValueError(f"unknown tool {tool!r}; choose from {', '.join(PASS_TOOLS)}")


def run_worker(tool: str, src: str, dst: str) -> dict[str, object]:
    """One measured load + transform + save in this process."""
    transform = _transform(tool)
    reset = _reset_peak()
    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    onnx.save(transform(onnx.load(src)), dst)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    return {"tool": tool, "seconds": seconds, "peak_bytes": (peak_kb - base_kb) * 1024, "peak_reset": reset}


def measure(tools: Sequence[str], src: Path, workdir: Path, reps: int) -> dict[str, PassCost]:
    """Run each tool ``reps`` times on ``src``, round-robin, each run in a fresh interpreter."""
    runs: dict[str, list[dict[str, object]]] = {t: [] for t in tools}
    errors: dict[str, str] = {}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
    }
    for _ in range(reps):
        for tool in tools:
            if tool in errors:
                continue
            dst = workdir / f"{src.stem}.{tool}.onnx"
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.passcost", tool, str(src), str(dst)],
                capture_output=True,
                text=True,
                env=env,
                cwd=_ROOT,
            )
            if proc.returncode != 0:
                lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
                errors[tool] = lines[-1]
                continue
            runs[tool].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            dst.unlink(missing_ok=True)
    out = {}
    for tool in tools:
        rs = runs[tool]
        if not rs:
            out[tool] = PassCost(tool, float("nan"), 0, 0, False, errors.get(tool, "no run"))
            continue
        out[tool] = PassCost(
            tool,
            statistics.median(float(r["seconds"]) for r in rs),
            max(int(r["peak_bytes"]) for r in rs),
            len(rs),
            all(bool(r["peak_reset"]) for r in rs),
        )
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m benchmarks.passcost TOOL IN.onnx OUT.onnx")
    print(json.dumps(run_worker(*sys.argv[1:])))
