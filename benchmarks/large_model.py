"""Merge a model over 2 GiB (external data): peak memory and wall time against a bare
``onnx.load`` + ``onnx.save`` of the same model, each measured in its own process.

Run from the repository root:  python -m benchmarks.large_model [--gib 2.3] [--dir DIR] [--keep]

The model: ``x[1, C, 2, 2]`` through huge 1x1 convolutions separated by Relu (they stay as they
are, but every byte of them is read and written), then a conv + BatchNormalization pair and a
3x3 conv + BatchNormalization pair that merge. Weights are random float32 written straight to
the data file with numpy, one conv at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_large_model", "measure", "main"]

#: Channels of the huge convs: one weight is C*C*4 bytes (256 MiB).
C = 8192
#: Free disk space the benchmark wants before it starts (model, outputs, baseline copy).
NEED_FREE_BYTES = 10 * 2**30


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.FLOAT
    tensor.dims.extend(dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def build_large_model(path: Path, gib: float = 2.3, seed: int = 0) -> int:
    """Write the model to ``path`` and its weights to ``path.data``; return the total bytes."""
    rng = np.random.default_rng(seed)
    location = path.name + ".data"
    per_conv = C * C * 4
    count = max(1, int(np.ceil(gib * 2**30 / per_conv)))
    nodes, inits = [], []
    y = "x"
    with open(path.parent / location, "wb") as data:
        for k in range(count):
            w = rng.standard_normal((C, C), dtype=np.float32)
            w *= np.float32(1.0 / np.sqrt(C))
            offset = data.tell()
            w.tofile(data)
            del w
            inits.append(_external(f"big{k}.weight", [C, C, 1, 1], location, offset, per_conv))
            nodes.append(
                helper.make_node(
                    "Conv", [y, f"big{k}.weight"], [f"big{k}"], name=f"big{k}", kernel_shape=[1, 1]
                )
            )
            nodes.append(helper.make_node("Relu", [f"big{k}"], [f"relu{k}"], name=f"relu{k}"))
            y = f"relu{k}"
    small = 64

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def bn(x: str, name: str) -> str:
        params = [
            const(f"{name}.scale", rng.uniform(0.5, 1.5, small)),
            const(f"{name}.bias", rng.uniform(-0.5, 0.5, small)),
            const(f"{name}.mean", rng.uniform(-0.5, 0.5, small)),
            const(f"{name}.var", rng.uniform(0.5, 2.0, small)),
        ]
        nodes.append(helper.make_node("BatchNormalization", [x, *params], [name], name=name))
        return name

    w = const("head.weight", rng.standard_normal((small, C, 1, 1)) / np.sqrt(C))
    nodes.append(
        helper.make_node("Conv", [y, w, const("head.b", rng.standard_normal(small))], ["head"], name="head")
    )
    y = bn("head", "head_bn")
    nodes.append(helper.make_node("Relu", [y], ["head_relu"], name="head_relu"))
    w = const("tail.weight", rng.standard_normal((small, small, 3, 3)) / np.sqrt(9 * small))
    nodes.append(helper.make_node("Conv", ["head_relu", w], ["tail"], name="tail", pads=[1, 1, 1, 1]))
    y = bn("tail", "y")
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, small, 2, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path.stat().st_size + (path.parent / location).stat().st_size


_RUNNER = """
import json, resource, sys, time
start = time.perf_counter()
exec(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

_BASELINE = """
import onnx
m = onnx.load(sys.argv[2])
onnx.save_model(m, sys.argv[3], save_as_external_data=True, location=sys.argv[3].rsplit('/', 1)[-1] + '.data')
"""

_MERGE = """
from convfuse_cli.main import main
try:
    main(sys.argv[2:])
except SystemExit as e:
    if e.code:
        raise
"""


def measure(code: str, *args: str) -> dict[str, Any]:
    """Wall time and peak RSS of ``code`` run in a fresh Python process (``sys.argv[2:]`` = args),
    and what it printed (``stdout``)."""
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, code, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"measured process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    *printed, last = done.stdout.strip().splitlines()
    return {**json.loads(last), "stdout": "\n".join(printed)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.3, help="size of the model's weights")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temporary directory)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--no-verify-run", action="store_true", help="skip the merge run that verifies")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="convfuse-large-", dir=args.dir))
    try:
        free = shutil.disk_usage(folder).free
        if free < NEED_FREE_BYTES:
            print(f"skipped: {free / 2**30:.1f} GiB free in {folder}, need {NEED_FREE_BYTES / 2**30:.0f} GiB")
            return
        src = folder / "large.onnx"
        start = time.perf_counter()
        total = build_large_model(src, args.gib)
        print(
            f"built {src} ({total / 2**30:.2f} GiB with external data) in {time.perf_counter() - start:.1f} s"
        )
        rows = [
            ("onnx.load + onnx.save", measure(_BASELINE, str(src), str(folder / "copy.onnx"))),
            (
                "convfuse merge --no-verify",
                measure(_MERGE, "merge", str(src), "-o", str(folder / "a.onnx"), "--no-verify"),
            ),
        ]
        if not args.no_verify_run:
            rows.append(
                (
                    "convfuse merge (verifies)",
                    measure(_MERGE, "merge", str(src), "-o", str(folder / "b.onnx")),
                )
            )
        print(f"{'':28}  {'wall s':>7}  {'peak RSS GiB':>12}  {'RSS / model':>11}")
        for name, m in rows:
            gib = m["peak_rss_bytes"] / 2**30
            print(f"{name:28}  {m['seconds']:7.1f}  {gib:12.2f}  {m['peak_rss_bytes'] / total:11.2f}")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
