"""Case 2 merged with a border correction (issue 14): speed-ups against the unmerged model and
against the case-1-only result (the border rule switched off), ONNX Runtime CPU and eager torch,
side by side in one run.

Models: the benchmark's ExpandNet chains (:mod:`benchmarks.models`, ``expandnet-s/m/l``) with
torch's default ``bias=True`` on every expanding 1x1 (the common way the block is written; the
registry's own blocks leave it off so that case 1 applies), and ``samples/expandnet.onnx``
(its last block has a biased 1x1). Variants, all fused under ``flops``:

- ``original``: the model as exported / as built;
- ``case 1 only``: convfuse with :func:`convfuse.border_map.border_merges` off;
- ``border``: convfuse as shipped (static size: ``Conv + Add(ring initializer)``; torch with
  ``example_inputs``: a ``BorderConv`` with the dense ring);
- ``border dyn``: spatial dims dynamic (ONNX: ``flops`` declines the ring built from the input's
  shape, 6 nodes for 2 removed; torch without ``example_inputs``: the ones-map conv in the
  module's forward);
- ``dyn always`` (ONNX): the same under ``always``, i.e. the run-time ring (Shape ..
  ConstantOfShape -> Conv -> Add), against declining it (``border dyn``).

Timed round-robin in one process (:mod:`benchmarks.timing`), one thread, batch 1.

    python -m benchmarks.border_merge [--reps 15] [--models expandnet-s,expandnet-m,expandnet-l]
"""

from __future__ import annotations

import argparse
import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import convfuse
from benchmarks.models import MODELS, ExpandBlock
from benchmarks.timing import interleaved
from convfuse.border_map import border_merges

__all__ = ["main"]

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "expandnet.onnx"


def _biased(module: nn.Module) -> nn.Module:
    """Every ExpandBlock's expanding 1x1 with torch's default bias (weights kept, bias drawn)."""
    gen = torch.Generator().manual_seed(7)
    for block in module.modules():
        if isinstance(block, ExpandBlock):
            old = block.expand
            new = nn.Conv2d(old.in_channels, old.out_channels, 1)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.copy_(0.5 * torch.randn(old.out_channels, generator=gen))
            block.expand = new
    return module.eval()


def _export(module: nn.Module, shape: tuple[int, ...], dynamic: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()
    axes = {"x": {0: "n", 2: "h", 3: "w"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(*shape),),
            buffer,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ops(model: onnx.ModelProto) -> str:
    c = Counter(n.op_type for n in model.graph.node)
    return f"Conv {c['Conv']:>2}  Add {c['Add']:>2}  nodes {sum(c.values()):>3}"


def _torch_ops(module: nn.Module) -> str:
    from convfuse.frontends.torch.ring import BorderConv

    convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
    rings = sum(isinstance(m, BorderConv) for m in module.modules())
    return f"Conv2d {convs:>2}  BorderConv {rings:>2}"


def _rel(ref: np.ndarray, out: np.ndarray) -> float:
    return float(np.abs(ref - out).max() / max(np.abs(ref).max(), 1e-30))


def _table(title: str, rows: dict[str, tuple[str, float]], times: dict[str, float]) -> None:
    print(title)
    base, case1 = times["original"], times.get("case 1 only")
    print(f"  {'variant':13}{'ops':34}{'ms':>9}{'vs orig':>9}{'vs case1':>9}{'rel.err':>10}")
    for k, (ops, err) in rows.items():
        t = times[k]
        vs1 = f"{case1 / t:>8.2f}x" if case1 else ""
        print(f"  {k:13}{ops:34}{t * 1e3:>9.3f}{base / t:>8.2f}x{vs1:>9}{err:>10.1e}")


def _onnx_rows(
    static: onnx.ModelProto, dynamic: onnx.ModelProto | None, shape: tuple[int, ...], reps: int
) -> None:
    with border_merges(False):
        case1, _ = convfuse.fuse_onnx(static)
    border, report = convfuse.fuse_onnx(static)
    models = {"original": static, "case 1 only": case1, "border": border}
    if dynamic is not None:
        models["border dyn"] = convfuse.fuse_onnx(dynamic)[0]
        models["dyn always"] = convfuse.fuse_onnx(dynamic, policy="always")[0]  # the run-time ring
    feed = {static.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    sessions = {k: _session(m) for k, m in models.items()}
    ref = sessions["original"].run(None, feed)[0]
    rows = {k: (_ops(models[k]), _rel(ref, s.run(None, feed)[0])) for k, s in sessions.items()}
    times = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, reps)
    _table("  ONNX Runtime CPU, 1 thread", rows, {k: t.median for k, t in times.items()})
    case2 = sum("padding case 2" in m.note for m in report.merges)
    print(f"  border merges (padding case 2): {case2}")


def _torch_rows(module: nn.Module, shape: tuple[int, ...], reps: int) -> None:
    x = torch.randn(*shape)
    with border_merges(False):
        case1 = convfuse.fuse(module, example_inputs=x)
    variants = {
        "original": module,
        "case 1 only": case1,
        "border": convfuse.fuse(module, example_inputs=x),
        "border dyn": convfuse.fuse(module),
    }
    with torch.no_grad():
        ref = module(x).numpy()
        rows = {k: (_torch_ops(m), _rel(ref, m(x).numpy())) for k, m in variants.items()}

        def call(m: nn.Module) -> object:
            with torch.no_grad():
                return m(x)

        times = interleaved({k: (lambda m=m: call(m)) for k, m in variants.items()}, reps)
    _table("  eager torch CPU, 1 thread", rows, {k: t.median for k, t in times.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--models", default="expandnet-s,expandnet-m,expandnet-l")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"ORT {ort.__version__}, torch {torch.__version__}; speed-up = original ms / variant ms")
    for name in args.models.split(","):
        spec = MODELS[name]
        module = _biased(spec.build())
        print(f"\n{name}: {spec.description}, expanding 1x1 with bias")
        _onnx_rows(
            _export(module, spec.input_shape, False),
            _export(module, spec.input_shape, True),
            spec.input_shape,
            args.reps,
        )
        _torch_rows(module, spec.input_shape, args.reps)
    sample = onnx.load(str(SAMPLE))
    shape = tuple(d.dim_value or 1 for d in sample.graph.input[0].type.tensor_type.shape.dim)
    print(f"\nsamples/expandnet.onnx: input {shape}")
    _onnx_rows(sample, None, shape, args.reps)


if __name__ == "__main__":
    main()
