"""Issue 11's figures: ops before and after for the linear-region blocks, in both front ends.

Each block (:mod:`benchmarks.region_blocks`) is fused by the torch front end (then exported to
ONNX to count its ops) and exported to ONNX then fused by the ONNX front end; the table gives
Conv / BatchNormalization / Add (+Sub, Sum) / Gemm (+MatMul) counts, parameters, Conv MACs, the
seconds each fuse took, the output error against the original and, with ``--time``, the
milliseconds per call before -> after (torch rows: eager torch; ONNX rows: ONNX Runtime; one
thread each), timed round-robin in one process (:func:`benchmarks.timing.interleaved`)::

    python -m benchmarks.linear_regions [--policy flops|always] [--only SUBSTRING] [--time]
"""

from __future__ import annotations

import argparse
import io
import time
import warnings
from collections import Counter

import onnx
import torch
from torch import nn

import convfuse
from convfuse.frontends.onnx.fold import fold_constants
from convfuse.frontends.onnx.stats import model_stats

from .region_blocks import BLOCKS, CASES, TWINS, Built
from .timing import interleaved

__all__ = ["export", "counts", "main"]

_GROUPS = {
    "Conv": ("Conv",),
    "BN": ("BatchNormalization",),
    "Add": ("Add", "Sub", "Sum"),
    "Gemm": ("Gemm", "MatMul"),
}


def export(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """``module`` exported to ONNX in train form (opset 17, TorchScript exporter without constant
    folding, so BatchNorms stay as nodes), in memory."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buf, opset_version=17, dynamo=False, do_constant_folding=False)
    return onnx.load_from_string(buf.getvalue())


def counts(model: onnx.ModelProto) -> dict[str, int | None]:
    """The table's op groups, parameters and Conv MACs of ``model``, counted on a copy whose
    constant shape arithmetic is folded (an exported ``F.pad`` computes its pads with Adds that
    are not part of the network)."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    fold_constants(folded)
    ops: Counter[str] = Counter(n.op_type for n in folded.graph.node)
    stats = model_stats(model)
    out: dict[str, int | None] = {k: sum(ops[o] for o in group) for k, group in _GROUPS.items()}
    out["params"], out["MACs"] = stats.params, stats.macs
    return out


def _outputs(out: object) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]  # type: ignore[list-item]


def _err(ref: object, got: object) -> float:
    errs = []
    for a, b in zip(_outputs(ref), _outputs(got)):
        scale = float(a.abs().max()) or 1.0
        errs.append(float((a - b).abs().max()) / scale)
    return max(errs)


def _onnx_err(model: onnx.ModelProto, x: torch.Tensor, ref: object) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]
    return _err(ref, got)


def _session(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _times(
    module: nn.Module,
    fused: nn.Module,
    original: onnx.ModelProto,
    fused_onnx: onnx.ModelProto,
    x: torch.Tensor,
) -> dict[str, float]:
    """Milliseconds per call of the four variants, timed round-robin."""
    sessions = {k: _session(m) for k, m in (("onnx before", original), ("onnx after", fused_onnx))}
    feed = {sessions["onnx before"].get_inputs()[0].name: x.numpy()}

    def eager(m: nn.Module):  # type: ignore[no-untyped-def]
        def run() -> object:
            with torch.no_grad():
                return m(x)

        return run

    def ort_run(name: str):  # type: ignore[no-untyped-def]
        return lambda: sessions[name].run(None, feed)

    variants = {"torch before": eager(module), "torch after": eager(fused)}
    variants |= {k: ort_run(k) for k in sessions}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like ONNX Runtime here: one thread each, less noise from others
    try:
        return {k: t.median * 1e3 for k, t in interleaved(variants, reps=15).items()}
    finally:
        torch.set_num_threads(threads)


def rows(name: str, built: Built, policy: str, timed: bool = False) -> list[str]:
    """Two table rows (torch, ONNX) for one block."""
    module, x = built
    with torch.no_grad():
        ref = module(x)
    original = export(module, x)
    before = counts(original)
    start = time.perf_counter()
    fused_torch = convfuse.fuse(module, policy=policy, example_inputs=x)
    t_torch = time.perf_counter() - start
    with torch.no_grad():
        torch_err = _err(ref, fused_torch(x))
    after_torch = counts(export(fused_torch, x))
    start = time.perf_counter()
    fused_onnx, _ = convfuse.fuse_onnx(original, policy=policy)
    t_onnx = time.perf_counter() - start
    after_onnx = counts(fused_onnx)
    onnx_err = _onnx_err(fused_onnx, x, ref)
    ms = _times(module, fused_torch, original, fused_onnx, x) if timed else {}

    def cell(key: str, after: dict[str, int | None]) -> str:
        a, b = before[key], after[key]
        return f"{a:,} -> {b:,}" if a is not None and b is not None else "?"

    out = []
    for front, after, secs, err in (
        ("torch", after_torch, t_torch, torch_err),
        ("onnx", after_onnx, t_onnx, onnx_err),
    ):
        cells = [cell(k, after) for k in ("Conv", "BN", "Add", "Gemm", "params", "MACs")]
        if timed:
            cells.append(f"{ms[front + ' before']:.3f} -> {ms[front + ' after']:.3f}")
        out.append(f"| {name} | {front} | " + " | ".join(cells) + f" | {secs:.2f} | {err:.1e} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="flops", choices=["flops", "always"])
    parser.add_argument("--only", default="", help="run the blocks whose name contains this")
    parser.add_argument("--time", action="store_true", help="also time each block before and after")
    args = parser.parse_args(argv)
    print(f"policy: {args.policy}\n")
    ms = " ms (eager torch / ORT) |" if args.time else ""
    print(f"| block | front end | Conv | BN | Add | Gemm | params | Conv MACs |{ms} fuse s | rel err |")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.time else "") + "---|---|")
    for table in (BLOCKS, TWINS, CASES):
        for name, build in table.items():
            if args.only in name:
                for row in rows(name, build(), args.policy, args.time):
                    print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
