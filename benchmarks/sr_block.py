"""Op counts and ONNX Runtime times before and after convfuse on a 4-block SR net (issue 16).

The net is :class:`tests.sr_models.SRNet` in train form (bias-filled borders by slice assignment,
``scale * mask`` depthwise weights), exported with ``do_constant_folding=False`` at a static size.
The original and the fused model are timed side by side in one process (:mod:`benchmarks.timing`),
ORT with its default graph optimizations, on one thread.

    python -m benchmarks.sr_block [--channels 16] [--size 64] [--reps 15]
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
from tests.sr_models import SRNet, export

__all__ = ["main"]

_SHOWN = ("Conv", "Add", "ScatterND", "Pad", "PRelu")


def _session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = export(SRNet(args.channels, args.blocks), (1, 3, args.size, args.size))
    t0 = time.perf_counter()
    fused, report = convfuse.fuse_onnx(model)
    fuse_s = time.perf_counter() - t0
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    sessions = {
        "original": _session(model.SerializeToString()),
        "convfuse": _session(fused.SerializeToString()),
    }
    outs = {k: s.run(None, {"x": x})[0] for k, s in sessions.items()}
    rel = float(np.abs(outs["original"] - outs["convfuse"]).max() / np.abs(outs["original"]).max())
    times = interleaved({k: (lambda s=s: s.run(None, {"x": x})) for k, s in sessions.items()}, args.reps)
    print(
        f"SR net: {args.blocks} blocks, {args.channels} channels, input 1x3x{args.size}x{args.size}, "
        f"ORT {ort.__version__} CPU, 1 thread"
    )
    counts = {
        "original": Counter(n.op_type for n in model.graph.node),
        "convfuse": Counter(n.op_type for n in fused.graph.node),
    }
    print(f"{'':10}{'nodes':>7}" + "".join(f"{op:>10}" for op in _SHOWN) + f"{'ORT ms':>10}{'IQR':>7}")
    for k in ("original", "convfuse"):
        c, t = counts[k], times[k]
        print(
            f"{k:10}{sum(c.values()):>7}"
            + "".join(f"{c[op]:>10}" for op in _SHOWN)
            + f"{t.median * 1e3:>10.3f}{t.spread:>7.0%}"
        )
    print(
        f"speed-up {times['original'].median / times['convfuse'].median:.2f}x; "
        f"max rel. error {rel:.2e}; fuse_onnx {fuse_s:.2f} s"
    )
    print("merges: " + ", ".join(f"{k.value} {n}" for k, n in report.merge_counts().items()))


if __name__ == "__main__":
    main()
