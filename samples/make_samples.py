"""Regenerate the sample ONNX models in this directory from torch, deterministically.

    python samples/make_samples.py            # writes samples/*.onnx
    python samples/make_samples.py --check    # exits 1 if the committed files differ

Each model is built with a fixed seed, put in eval mode (BatchNorm statistics random but fixed,
so folding them is not trivial) and exported with torch's TorchScript exporter
(``dynamo=False``: the default dynamo exporter needs onnxscript), keeping BatchNormalization
and Add nodes (``training=PRESERVE``, ``do_constant_folding=False``). Batch size is dynamic,
spatial size static.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
INPUT = (1, 3, 32, 32)


def _bn(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm with random (seeded) inference statistics."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


class ExpandBlock(nn.Module):
    """ExpandNet-CL block: 1x1 (C -> rC), kxk (rC -> rC), 1x1 (rC -> C), no nonlinearity inside.

    With ``expand_bias=True`` the first 1x1 has a bias: the kxk's zero padding then no longer
    matches (padding case 2) and only the kxk and the last 1x1 merge.
    """

    def __init__(self, channels: int, ratio: int = 4, kernel: int = 3, expand_bias: bool = False) -> None:
        super().__init__()
        wide = channels * ratio
        self.expand = nn.Conv2d(channels, wide, 1, bias=expand_bias)
        self.spatial = nn.Conv2d(wide, wide, kernel, padding=kernel // 2)
        self.project = nn.Conv2d(wide, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.spatial(self.expand(x)))


class ExpandNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(
            ExpandBlock(16),
            nn.ReLU(),
            ExpandBlock(16),
            nn.ReLU(),
            ExpandBlock(16, expand_bias=True),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class RepVGGBlock(nn.Module):
    """RepVGG training form: 3x3 conv + BN, 1x1 conv + BN and (same shape) a BN identity, summed."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn(cout))
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
        self.identity = _bn(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class RepVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            RepVGGBlock(3, 16, 2),
            RepVGGBlock(16, 16),
            RepVGGBlock(16, 32, 2),
            RepVGGBlock(32, 32),
            RepVGGBlock(32, 32),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvBN(nn.Module):
    """Conv + BN + ReLU stages, then a depthwise 3x3 + BN feeding a pointwise 1x1 + BN directly
    (MobileNet's linear pair): each BN folds; depthwise into pointwise would cost more and is
    declined under the default policy."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), _bn(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), _bn(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), _bn(32),
            nn.Conv2d(32, 64, 1, bias=False), _bn(64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


SAMPLES = {"expandnet": ExpandNet, "repvgg": RepVGG, "convbn": ConvBN}


def export(name: str) -> bytes:
    """The ONNX bytes of sample ``name`` (seed 0, eval mode, opset 17)."""
    torch.manual_seed(0)
    model = SAMPLES[name]().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in favour of dynamo
        torch.onnx.export(
            model,
            (torch.randn(*INPUT),),
            buffer,
            dynamo=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed files instead of writing"
    )
    args = parser.parse_args()
    stale = []
    for name in SAMPLES:
        data = export(name)
        path = HERE / f"{name}.onnx"
        if args.check:
            if not path.exists() or path.read_bytes() != data:
                stale.append(path.name)
        else:
            path.write_bytes(data)
            print(f"wrote {path} ({len(data):,} bytes)")
    if stale:
        print(f"out of date: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
