"""Markdown tables and target verdicts from a :class:`~benchmarks.results.Results`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from . import adapters, onnx_tools
from .results import (
    AA,
    CHAIN_FRACTION,
    MAX_REL_ERR,
    PASS_MEMORY_RATIO,
    PASS_TIME_RATIO,
    SLOWER_TOLERANCE,
    VARIANTS,
    ModelResult,
    Results,
)
from .timing import Timing

__all__ = ["render"]


def _ms(t: Timing | None) -> str:
    return "—" if t is None else f"{t.median * 1e3:.3g}"


def _x(num: float | None, den: float | None) -> str:
    if num is None or den is None or not den or not math.isfinite(num) or not math.isfinite(den):
        return "—"
    return f"{num / den:.2f}×"


def _cores(n: float | None) -> str:
    return "—" if n is None else f"{n:.2f} cores"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _med(t: dict[str, Timing], key: str) -> float | None:
    return t[key].median if key in t else None


def _latency_table(results: Sequence[ModelResult], threads: int) -> str:
    header = ["model"] + [f"{VARIANTS[k][0]} ms" for k in VARIANTS]
    header += ["convfuse vs ORT-opt", "convfuse+ORT-opt vs ORT-opt", "A/A noise", "other load"]
    rows = []
    for r in results:
        t = r.ort.get(threads)
        if not t:
            continue
        base = _med(t, "original")
        cells = [r.name]
        for key in VARIANTS:
            if key not in t:
                cells.append("n/a")
            elif key == "original":
                cells.append(_ms(t[key]))
            else:
                cells.append(f"{_ms(t[key])} ({_x(base, t[key].median)})")
        cells.append(_x(_med(t, "ort"), _med(t, "convfuse")))
        cells.append(_x(_med(t, "ort"), _med(t, "convfuse+ort")))
        cells.append(_x(base, _med(t, AA)))
        cells.append(_cores(r.background))
        rows.append(cells)
    return _table(header, rows)


def _graph_table(results: Sequence[ModelResult]) -> str:
    header = ["model"] + [f"{VARIANTS[k][0]} Conv/BN/Add (all)" for k in VARIANTS]
    header += [
        "MACs original",
        "MACs onnxsim",
        "MACs onnxoptimizer",
        "MACs convfuse",
        "MAC ratio",
        "convfuse merged / declined",
    ]
    rows = []
    for r in results:
        if not r.ort:
            continue
        cells = [r.name]
        for key in VARIANTS:
            c = r.counts.get(key)
            cells.append(
                "n/a" if c is None else f"{c['Conv']}/{c['BatchNormalization']}/{c['Add']} ({c['all']})"
            )
        for key in ("original", "onnxsim", "onnxoptimizer", "convfuse"):
            m = r.macs.get(key)
            cells.append("n/a" if m is None else f"{m / 1e6:.1f} M")
        cells.append(_x(r.macs.get("original"), r.macs.get("convfuse")))
        declined = ", ".join(f"{k} {v}" for k, v in sorted(r.declines.items())) or "none"
        cells.append("n/a" if r.merges is None else f"{r.merges} / {sum(r.declines.values())} ({declined})")
        rows.append(cells)
    return _table(header, rows)


def _error_table(results: Sequence[ModelResult]) -> str:
    keys = [k for k in VARIANTS if k != "original"]
    header = ["model"] + [VARIANTS[k][0] for k in keys] + ["torch convfuse.fuse"]
    rows = []
    for r in results:
        if not r.ort:
            continue
        cells = [r.name] + [f"{r.rel_err[k]:.1e}" if k in r.rel_err else "n/a" for k in keys]
        cells.append("n/a" if r.eager_rel_err is None else f"{r.eager_rel_err:.1e}")
        rows.append(cells)
    return _table(header, rows)


def _eager_table(results: Sequence[ModelResult], threads: Sequence[int]) -> str:
    header = ["model"]
    for n in threads:
        header += [f"original ms ({n}T)", f"convfuse.fuse ms ({n}T)", f"speed-up ({n}T)", f"A/A noise ({n}T)"]
    rows = []
    for r in results:
        if not r.eager:
            continue
        cells = [r.name]
        for n in threads:
            t = r.eager.get(n, {})
            base = _med(t, "original")
            cells += [
                _ms(t.get("original")),
                _ms(t.get("convfuse")),
                _x(base, _med(t, "convfuse")),
                _x(base, _med(t, AA)),
            ]
        rows.append(cells)
    return _table(header, rows)


def _pass_table(results: Sequence[ModelResult]) -> str:
    header = [
        "model",
        "file",
        "load+save s",
        "convfuse s",
        "onnxsim s",
        "onnxoptimizer s",
        "peak mem load+save",
        "peak mem convfuse",
        "peak mem onnxsim",
        "how",
    ]
    rows = []
    for r in results:
        p = r.passes
        if not p:
            continue
        rt = p.get("roundtrip")

        def secs(tool: str, p=p, rt=rt) -> str:
            c = p.get(tool)
            if c is None or not c.runs:
                return "n/a"
            ratio = "" if tool == "roundtrip" else f" ({_x(c.seconds, rt.seconds if rt else None)})"
            return f"{c.seconds:.3g}{ratio}"

        def mem(tool: str, p=p, r=r) -> str:
            c = p.get(tool)
            if r.pass_in_process or c is None or not c.runs:
                return "—"
            return f"{_mb(c.peak_bytes)} ({c.peak_bytes / r.file_bytes:.2f}× file)"

        runs = max(c.runs for c in p.values())
        how = "in-process, warm" if r.pass_in_process else f"fresh subprocess each, {runs} runs"
        rows.append(
            [
                r.name,
                _mb(r.file_bytes),
                secs("roundtrip"),
                secs("convfuse"),
                secs("onnxsim"),
                secs("onnxoptimizer"),
                mem("roundtrip"),
                mem("convfuse"),
                mem("onnxsim"),
                how,
            ]
        )
    return _table(header, rows)


def _contended(r: ModelResult, threads: int, cores: int) -> bool:
    """Whether other processes used the cores ``threads`` timed threads needed, while ``r`` was timed.

    Contended when they kept more than (free cores - 0.5), at least 0.25, cores busy on average:
    even a neighbour on the other core of a 2-core machine shifts 1-thread timings by several %.
    """
    return r.background is not None and r.background > max(0.25, cores - threads - 0.5)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _chain_targets(results: Sequence[ModelResult], threads: Sequence[int], cores: int) -> list[list[str]]:
    """ExpandNet chains: convfuse's speed-up against the MAC ratio, ORT off and ORT-opt."""
    goal = f"ExpandNet speed-up ≥ {CHAIN_FRACTION} × MAC ratio"
    rows = []
    for r in results:
        if r.family != "expandnet" or not r.ort:
            continue
        ratio = (r.macs.get("original") or 0) / r.macs["convfuse"] if r.macs.get("convfuse") else None
        for n in threads:
            t = r.ort.get(n, {})
            for new, ref, label in (("convfuse", "original", "ORT off"), ("convfuse+ort", "ort", "ORT-opt")):
                case = f"{r.name}, {n}T, {label}"
                if ratio is None or new not in t or ref not in t:
                    rows.append([goal, case, "n/a", "n/a"])
                    continue
                speed = t[ref].median / t[new].median
                frac = speed / ratio
                measured = f"{speed:.2f}× of {ratio:.2f}× MAC ratio = {frac:.2f}"
                verdict = _verdict(frac >= CHAIN_FRACTION)
                if _contended(r, n, cores):
                    verdict = f"inconclusive (contended; {verdict})"
                rows.append([goal, case, measured, verdict])
    return rows


def _slower_targets(results: Sequence[ModelResult], threads: Sequence[int], cores: int) -> list[list[str]]:
    """No model slower after convfuse, beyond the noise of the run.

    "Slower" means slower by more than the larger of :data:`SLOWER_TOLERANCE` and the A/A
    deviation (the original against an identical copy) measured in the same repetitions. Cases
    timed while other processes contended for the cores are listed apart and decide nothing.
    """
    cases: dict[str, list[tuple[float, float, str, bool]]] = {"ORT off": [], "ORT-opt": [], "torch eager": []}
    for r in results:
        for n in threads:
            t, e = r.ort.get(n, {}), r.eager.get(n, {})
            pairs = (
                ("ORT off", t, "convfuse", "original"),
                ("ORT-opt", t, "convfuse+ort", "ort"),
                ("torch eager", e, "convfuse", "original"),
            )
            for label, timings, new, ref in pairs:
                if new in timings and ref in timings:
                    aa = timings["original"].median / timings[AA].median if AA in timings else 1.0
                    tol = max(SLOWER_TOLERANCE, abs(1 - aa))
                    speed = timings[ref].median / timings[new].median
                    cases[label].append((speed, tol, f"{r.name} {n}T", _contended(r, n, cores)))
    rows = []
    for label, found in cases.items():
        goal = f"no model slower after convfuse ({label})"
        clean = [c for c in found if not c[3]]
        if not clean:
            rows.append([goal, f"{len(found)} model/thread cases, all contended", "n/a", "inconclusive"])
            continue
        speed, tol, where, _ = min(clean)
        slower = [f"{w} {s:.2f}×" for s, t, w, _ in clean if s < 1 - t]
        measured = f"worst {speed:.2f}× ({where}; noise ±{tol * 100:.0f} %)"
        measured += f"; slower beyond noise: {', '.join(slower)}" if slower else "; none slower beyond noise"
        contended = [f"{w} {s:.2f}×" for s, _, w, c in found if c]
        if contended:
            measured += f"; contended, not judged: {', '.join(contended)}"
        rows.append(
            [
                goal,
                f"{len(clean)} of {len(found)} model/thread cases uncontended",
                measured,
                _verdict(not slower),
            ]
        )
    return rows


def _pass_targets(results: Sequence[ModelResult]) -> list[list[str]]:
    """Large models: convfuse's file-to-file time and peak memory against a bare load + save."""
    rows = []
    for r in results:
        if r.pass_in_process:
            continue
        rt, cf = r.passes.get("roundtrip"), r.passes.get("convfuse")
        case = f"{r.name} ({_mb(r.file_bytes)})"
        if not (rt and cf and rt.runs and cf.runs):
            goal = (
                f"merge pass ≤ {PASS_TIME_RATIO:g}× load+save and memory < {PASS_MEMORY_RATIO:g}× model size"
            )
            rows.append([goal, case, "n/a", "n/a"])
            continue
        q = cf.seconds / rt.seconds
        measured = f"{cf.seconds:.2f} s vs {rt.seconds:.2f} s = {q:.2f}×"
        rows.append(
            [f"merge pass ≤ {PASS_TIME_RATIO:g}× load+save", case, measured, _verdict(q <= PASS_TIME_RATIO)]
        )
        m = cf.peak_bytes / r.file_bytes
        extra = (cf.peak_bytes - rt.peak_bytes) / r.file_bytes
        measured = (
            f"{_mb(cf.peak_bytes)} = {m:.2f}× (bare load+save: {rt.peak_bytes / r.file_bytes:.2f}×; "
            f"convfuse's own extra: {extra:+.2f}×)"
        )
        rows.append(
            [
                f"merge pass peak memory < {PASS_MEMORY_RATIO:g}× model size",
                case,
                measured,
                _verdict(m < PASS_MEMORY_RATIO),
            ]
        )
    return rows


def _accuracy_target(results: Sequence[ModelResult]) -> list[str]:
    """Every variant within :data:`MAX_REL_ERR` of the original (DESIGN.md section 4)."""
    bad = [f"{r.name}/{k} {e:.1e}" for r in results for k, e in r.rel_err.items() if e > MAX_REL_ERR]
    bad += [f"{r.name}/torch {r.eager_rel_err:.1e}" for r in results if (r.eager_rel_err or 0) > MAX_REL_ERR]
    return [
        f"every variant computes the same function (rel. err ≤ {MAX_REL_ERR:g})",
        "all models",
        ", ".join(bad) or "all within",
        _verdict(not bad),
    ]


def _targets(results: Sequence[ModelResult], threads: Sequence[int], cores: int) -> str:
    rows = _chain_targets(results, threads, cores) + _slower_targets(results, threads, cores)
    rows += _pass_targets(results)
    rows.append(_accuracy_target(results))
    return _table(["target", "case", "measured", "verdict"], rows)


def _contention(results: Sequence[ModelResult], threads: int, cores: int) -> list[str]:
    """A warning naming the models whose ``threads``-thread timings shared cores with other processes."""
    hit = [
        f"{r.name} ({r.background:.2f})" for r in results if _contended(r, threads, cores) and r.background
    ]
    if not hit:
        return []
    return [
        f"**Contended ({threads}T):** other processes kept cores busy while these were timed (cores in "
        f"brackets, of {cores}): {', '.join(hit)}. Their ratios are only as good as their A/A column; the "
        "targets below do not judge them. (torch's OpenMP threads degrade much more than ORT's.)",
        "",
    ]


def render(res: Results) -> str:
    """The whole report as Markdown."""
    o = res.options
    out = ["# convfuse benchmarks", ""]
    out.append("Machine: " + "; ".join(f"{k} {v}" for k, v in res.machine.items()))
    out.append("")
    out.append(
        f"Load average (1 min) at start {res.load[0]:.2f}, at end {res.load[1]:.2f}. Other processes "
        "share the machine's cores: `other load` is the average number of cores they kept busy while a "
        "model was timed (ORT and torch), and the `A/A noise` columns (the original against an identical "
        "copy, timed in the same round-robin) show the resulting noise floor. Read a difference smaller "
        "than the A/A deviation as no difference."
    )
    out.append("")
    out.append(
        f"Settings: batch 1, opset {onnx_tools.OPSET}, train-form export (BatchNormalization kept); "
        f"latency = median of {o.reps} round-robin repetitions per variant; ORT CPU provider, "
        f"sequential, inter-op 1 thread, spinning off. Tool outputs (onnxsim, onnxoptimizer, convfuse) "
        f"run with ORT graph optimizations DISABLED, like `original`; `ORT-opt` and `convfuse+ORT-opt` "
        f"use ORT_ENABLE_ALL. convfuse policy: `{adapters.DEFAULT_POLICY}` (default)."
    )
    out.append("")
    latency = [r for r in res.models if r.ort]
    for n in o.threads:
        out += [
            f"## ONNX Runtime latency, {n} intra-op thread{'s' if n > 1 else ''} "
            "(ms; in brackets: speed-up vs original)",
            "",
            _latency_table(latency, n),
            "",
        ]
        out += _contention(latency, n, res.cores)
    out += [
        "## Graph: nodes (Conv/BatchNormalization/Add) and MACs",
        "",
        "Conv/BN/Add count nodes on the data path (depending on the input); in brackets: all nodes, "
        "including arithmetic on constants only (onnxoptimizer's fuse_bn_into_conv emits the fused-weight "
        "arithmetic as Mul/Add/Sqrt/... nodes, left for a constant folder). ORT-opt counts are of the "
        "graph ORT runs after ORT_ENABLE_ALL (fused and NCHWc convs counted as Conv, Sum as Add). "
        "MACs count Conv/Gemm/MatMul at batch 1.",
        "",
        _graph_table(latency),
        "",
    ]
    out += [
        "## Numeric agreement with the original (max |error| / max |output|, float32)",
        "",
        _error_table(latency),
        "",
    ]
    if o.torch:
        out += [
            "## torch eager latency (ms): original module vs `convfuse.fuse(module)`",
            "",
            _eager_table(latency, o.threads),
            "",
        ]
        for n in o.threads:
            out += _contention(latency, n, res.cores)
    out += [
        "## Merge pass cost: file to file (onnx.load + transform + onnx.save)",
        "",
        "`load+save` is the bare round trip; brackets: ratio to it. Peak memory = peak resident set during "
        "the pass minus the resident set just before it (imports done), measured in a fresh subprocess "
        "for the large model only.",
        "",
        _pass_table(res.models),
        "",
    ]
    out += ["## Targets (reported, not asserted)", "", _targets(res.models, o.threads, res.cores), ""]
    if res.failures:
        out += ["## Not measured", ""] + [f"- {f}" for f in res.failures] + [""]
    return "\n".join(out)
