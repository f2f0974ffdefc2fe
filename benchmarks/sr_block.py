"""Op counts and times before and after convfuse on a 4-block SR net, both forms, both front ends
(issue 16).

The net is :class:`tests.support.sr_models.SRNet`: the train form (bias-filled borders by slice
assignment, ``scale * mask`` depthwise weights, five branches per block) and the eval form
(``rep_params()`` builds the merged kernel in every forward). Torch: ``convfuse.fuse`` on the
module, eager time on one thread, ATen ops and convolutions per forward. ONNX: the same module
exported with ``do_constant_folding=False`` at a static size, ``convfuse.fuse_onnx``, ONNX
Runtime time (default graph optimizations, one thread), graph nodes and Conv nodes. Original and
fused are timed side by side in one process (:mod:`benchmarks.timing`).

    python -m benchmarks.sr_block [--channels 16] [--size 64] [--blocks 4] [--reps 15]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import onnxruntime as ort
import torch

import convfuse
from benchmarks.timing import interleaved
from tests.support.sr_models import SRNet, aten_ops, export

__all__ = ["main"]

_SHOWN = ("Conv", "Add", "ScatterND", "Pad", "PRelu")


def _session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _torch_rows(model: torch.nn.Module, x: torch.Tensor, reps: int) -> list[tuple[str, ...]]:
    t0 = time.perf_counter()
    fused = convfuse.fuse(model, example_inputs=x)
    fuse_s = time.perf_counter() - t0
    with torch.no_grad():
        rel = _rel(model(x).numpy(), fused(x).numpy())

        def run(m: torch.nn.Module):  # noqa: ANN202
            return lambda: m(x)

        times = interleaved({"original": run(model), "convfuse": run(fused)}, reps)
    rows = []
    for name, m in (("original", model), ("convfuse", fused)):
        ops = aten_ops(m, x)
        t = times[name]
        rows.append(
            (
                "torch",
                name,
                f"{sum(ops.values())}",
                f"{ops['convolution']}",
                f"{t.median * 1e3:.3f}",
                f"{t.spread:.0%}",
            )
        )
    speed = times["original"].median / times["convfuse"].median
    rows.append(("torch", f"speed-up {speed:.2f}x, max rel. error {rel:.1e}, fuse {fuse_s:.1f} s"))
    return rows


def _onnx_rows(model: torch.nn.Module, shape: tuple[int, ...], reps: int) -> list[tuple[str, ...]]:
    proto = export(model, shape)
    t0 = time.perf_counter()
    fused, _ = convfuse.fuse_onnx(proto)
    fuse_s = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sessions = {
        "original": _session(proto.SerializeToString()),
        "convfuse": _session(fused.SerializeToString()),
    }
    outs = {k: s.run(None, {"x": x})[0] for k, s in sessions.items()}
    times = interleaved({k: (lambda s=s: s.run(None, {"x": x})) for k, s in sessions.items()}, reps)
    rows = []
    for name, graph in (("original", proto), ("convfuse", fused)):
        c = Counter(n.op_type for n in graph.graph.node)
        t = times[name]
        rows.append(
            ("ONNX", name, f"{sum(c.values())}", f"{c['Conv']}", f"{t.median * 1e3:.3f}", f"{t.spread:.0%}")
        )
    speed = times["original"].median / times["convfuse"].median
    rel = _rel(outs["original"], outs["convfuse"])
    rows.append(("ONNX", f"speed-up {speed:.2f}x, max rel. error {rel:.1e}, fuse_onnx {fuse_s:.1f} s"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--forms", default="train,eval")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = (1, 3, args.size, args.size)
    print(
        f"SR net: {args.blocks} blocks, {args.channels} channels, input 1x{'x'.join(map(str, shape[1:]))}, "
        f"torch {torch.__version__} eager and ORT {ort.__version__} CPU, 1 thread"
    )
    head = ("form", "front end", "model", "ops", "convs", "ms", "IQR")
    print("".join(f"{h:>12}" for h in head))
    for form in args.forms.split(","):
        torch.manual_seed(0)
        model = SRNet(args.channels, args.blocks, form=form).eval()
        x = torch.randn(*shape)
        for row in _torch_rows(model, x, args.reps) + _onnx_rows(model, shape, args.reps):
            if len(row) == 2:  # the summary line of a front end
                print(f"{'':>12}{row[0]:>12}  {row[1]}")
            else:
                print(f"{form:>12}" + "".join(f"{v:>12}" for v in row))
    print("ops: ATen ops per forward (torch), graph nodes (ONNX); convs: convolutions run / Conv nodes")


if __name__ == "__main__":
    main()
