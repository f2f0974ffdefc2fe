"""The figures issue 10 asks for, per public-style test model: convs and BatchNorms before and
after ``convfuse.fuse``, the worst fp32 relative error over a few inputs, how each changed
module was written back, and which parts were left unfused and why.

    .venv/bin/python benchmarks/torch_identity.py [--seeds 3]

Models: ``tests/support/public_style_models.py`` (YOLO-style detector, SR net, its reflect-padding twin)
and two of ``tests/frontends/torch/test_torch_identity.py`` (a control-flow child, a block with methods).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convfuse  # noqa: E402
from convfuse.frontends.torch.surgery import generated_code  # noqa: E402
from tests.frontends.torch.test_torch_identity import _Stage, _WithGate  # noqa: E402
from tests.support._torch_models import randomize_bn  # noqa: E402
from tests.support.helpers import rel_err  # noqa: E402
from tests.support.public_style_models import DetectionModel, SRNet  # noqa: E402

MODELS = {
    "yolo-style detector": (lambda: DetectionModel(), (3, 64, 64)),
    "SR net (3 train-form blocks)": (lambda: SRNet(num_block=3), (3, 24, 24)),
    "SR net, reflect pad (twin)": (lambda: SRNet(num_block=3, pad_mode="reflect"), (3, 24, 24)),
    "control flow in one child": (lambda: _WithGate(), (3, 12, 12)),
    "block with methods": (lambda: _Stage(8), (8, 12, 12)),
}


def _counts(model: nn.Module) -> tuple[int, int]:
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return convs, bns


def _leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _leaves(item)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, (make, shape) in MODELS.items():
        torch.manual_seed(0)
        model = randomize_bn(make()).eval()
        fused, report = convfuse.fuse(model, return_report=True)
        worst = 0.0
        with torch.no_grad():
            for seed in range(args.seeds):
                x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
                worst = max(worst, *(rel_err(a, b) for a, b in zip(_leaves(model(x)), _leaves(fused(x)))))
        (c0, b0), (c1, b1) = _counts(model), _counts(fused)
        generated = [n or "(root)" for n, m in fused.named_modules() if generated_code(m)]
        print(f"## {name}")
        print(f"convs {c0} -> {c1}, BatchNorm {b0} -> {b1}, max fp32 relative error {worst:.2e}")
        print(f"class kept: {type(fused).__name__}; generated forwards: {', '.join(generated) or 'none'}")
        print(
            f"merges: {len(report.merges)}; kept (declined) lines by reason: "
            f"{dict(Counter(d.reason.value for d in report.declines))}"
        )
        for d in report.declines:
            if d.reason.value in (
                "untraceable",
                "unsupported",
                "self-check",
                "padded-after-spatial",
                "padding-mode",
            ):
                print(f"  - {d.line()[:240]}")
        for note in report.notes:
            if note.startswith(("self-check", "fused child by child", "not traced")):
                print(f"  note: {note}")
        print()


if __name__ == "__main__":
    main()
