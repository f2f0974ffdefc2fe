"""Transposed convs through the planner: worst float64 error per rule, and the decoder's op counts.

    python -m benchmarks.transpose_planner [CASES]

Per rule (a BN / 1x1 / biased 1x1 before a random ConvTranspose1d/2d/3d, a BN / 1x1 after it,
a sum of two transposed convs on one grid), ``CASES`` random float64 models (kernels 1-5,
strides 1-3, padding, output_padding, dilation 1-2, groups) fused by ``convfuse.fuse`` under
``always``; printed: cases merged / declined and the worst ``max |err| / max |out|`` against the
unfused model. Then the small decoder (conv-BN-ReLU, ConvTranspose-BN-ReLU, ConvTranspose-1x1)
before and after, in both front ends (ONNX through the TorchScript exporter and ONNX Runtime).
"""

from __future__ import annotations

import io
import sys
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

import convfuse

_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Decoder(nn.Module):
    """conv-BN-ReLU, ConvTranspose-BN-ReLU, ConvTranspose-1x1: a segmentation head's upsampler."""

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.conv = _CONV[n - 1](3, 8, 3, padding=1)
        self.bn1 = _BN[n - 1](8)
        self.up = _CONVT[n - 1](8, 8, 4, stride=2, padding=1)
        self.bn2 = _BN[n - 1](8)
        self.up2 = _CONVT[n - 1](8, 6, 2, stride=2)
        self.head = _CONV[n - 1](6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv(x)))
        x = F.relu(self.bn2(self.up(x)))
        return self.head(self.up2(x))


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters away from the identity; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _BN):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return module.eval()


class _Sum(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _wider(t: nn.Module) -> nn.Module:
    """The same grid with a kernel two taps wider, cropped one dilation more on each side."""
    k = tuple(kk + 2 for kk in t.kernel_size)
    p = tuple(pp + dd for pp, dd in zip(t.padding, t.dilation))
    return type(t)(
        t.in_channels, t.out_channels, k, t.stride, p, t.output_padding, t.groups, True, t.dilation
    )


def _case(rng: np.random.Generator, rule: str) -> tuple[nn.Module, tuple[int, ...]]:
    n = int(rng.integers(1, 4))
    g = int(rng.choice([1, 2]))
    ci, co = g * int(rng.integers(1, 3)), g * int(rng.integers(1, 3))
    k = tuple(int(rng.integers(1, 6 if n < 3 else 4)) for _ in range(n))
    s = tuple(int(rng.integers(1, 4)) for _ in range(n))
    d = tuple(int(rng.integers(1, 3)) for _ in range(n))
    if rule in ("BN before", "bias 1x1 before") and rng.random() < 0.5:  # stride 1, rims cropped: folds
        s, p, op = (1,) * n, tuple(dd * (kk - 1) for kk, dd in zip(k, d)), (0,) * n
    else:
        p = tuple(int(rng.integers(0, dd * (kk - 1) + 1)) for kk, dd in zip(k, d))
        op = tuple(int(rng.integers(0, max(ss, dd))) for ss, dd in zip(s, d))
    convt = _CONVT[n - 1](ci, co, k, s, p, op, groups=g, bias=bool(rng.random() < 0.5), dilation=d)
    layers: list[nn.Module] = {
        "BN after": [convt, _BN[n - 1](co)],
        "1x1 after": [convt, _CONV[n - 1](co, int(rng.integers(1, 4)), 1)],
        "BN before": [_BN[n - 1](ci), convt],
        "1x1 before (no bias)": [_CONV[n - 1](ci, ci, 1, bias=False), convt],
        "bias 1x1 before": [_CONV[n - 1](ci, ci, 1), convt],
        "sum on one grid": [_Sum(convt, _wider(convt))],
    }[rule]
    size = tuple(
        1 + int(np.ceil(max(0, 2 * pp - dd * (kk - 1) - oo) / ss)) + int(rng.integers(0, 3))
        for kk, ss, dd, pp, oo in zip(k, s, d, p, op)
    )
    torch.manual_seed(int(rng.integers(0, 2**16)))
    return randomise(nn.Sequential(*layers).double(), int(rng.integers(0, 2**16))), (ci, *size)


def precision(cases: int) -> list[tuple[str, int, int, float]]:
    rng = np.random.default_rng(0)
    rows = []
    rules = (
        "BN after",
        "1x1 after",
        "BN before",
        "1x1 before (no bias)",
        "bias 1x1 before",
        "sum on one grid",
    )
    for rule in rules:
        merged = declined = 0
        worst = 0.0
        for _ in range(cases):
            model, shape = _case(rng, rule)
            x = torch.randn(2, *shape, dtype=torch.float64)
            fused, report = convfuse.fuse(model, policy="always", return_report=True)
            with torch.no_grad():
                want, got = model(x), fused(x)
            worst = max(worst, float((want - got).abs().max() / want.abs().max().clamp_min(1e-300)))
            merged += bool(report.merges)
            declined += not report.merges
        rows.append((rule, merged, declined, worst))
    return rows


def _export(module: nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(*shape),), buf, opset_version=17, dynamo=False,
                          do_constant_folding=False, input_names=["x"], output_names=["y"])  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def decoder() -> list[str]:
    model = randomise(Decoder())
    x = torch.randn(1, 3, 16, 16)
    fused, report = convfuse.fuse(model, return_report=True, example_inputs=x)

    def layers(m: nn.Module) -> Counter[str]:
        return Counter(type(c).__name__ for c in m.modules() if next(c.children(), None) is None)

    with torch.no_grad():
        err = float((model(x) - fused(x)).abs().max() / model(x).abs().max())
    lines = [f"torch: {dict(layers(model))} -> {dict(layers(fused))}, MACs {report.before.macs:,} -> "
             f"{report.after.macs:,}, rel err {err:.2e}"]  # fmt: skip
    source = _export(model, tuple(x.shape))
    fused_onnx, onnx_report = convfuse.fuse_onnx(source)
    outs = [
        ort.InferenceSession(m.SerializeToString()).run(None, {"x": x.numpy()})[0]
        for m in (source, fused_onnx)
    ]
    err = float(np.abs(outs[0] - outs[1]).max() / np.abs(outs[0]).max())

    def ops(m: onnx.ModelProto) -> dict[str, int]:
        return dict(Counter(node.op_type for node in m.graph.node))

    lines.append(f"onnx:  {ops(source)} -> {ops(fused_onnx)}, MACs {onnx_report.before.macs:,} -> "
                 f"{onnx_report.after.macs:,}, rel err {err:.2e}")  # fmt: skip
    return lines


def main(argv: list[str]) -> None:
    cases = int(argv[0]) if argv else 100
    print(f"| rule (through the planner, float64, {cases} random models each) | merged | declined | worst |")
    print("|---|---|---|---|")
    for rule, merged, declined, worst in precision(cases):
        print(f"| {rule} | {merged} | {declined} | {worst:.2e} |")
    print()
    print("decoder (conv-BN-ReLU, ConvTranspose-BN-ReLU, ConvTranspose-1x1), 1x3x16x16, policy flops:")
    for line in decoder():
        print("  " + line)


if __name__ == "__main__":
    main(sys.argv[1:])
