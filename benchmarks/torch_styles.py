"""Per block style: convs, parameters and MACs before/after ``convfuse.fuse``, and the worst
fp32 relative error (max abs error / max abs output) over seeds and input sizes.

    .venv/bin/python benchmarks/torch_styles.py [--seeds 5] [--threads 1]

Uses the small test-suite models of ``tests/support/_torch_models.py`` (random BN statistics).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _torch_models import STYLES, count_convs, rel_error  # noqa: E402

import convfuse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [(16, 16), (17, 15), (32, 31)]
    header = (
        f"{'style':<11} {'convs':>9} {'params':>15} {'MACs (N=1, 32x31)':>23} "
        f"{'worst fp32 rel err':>19} {'fp64':>9} {'fuse s':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, (make, c_in, _, _) in STYLES.items():
        worst32 = worst64 = 0.0
        times = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = make().eval()
            start = time.perf_counter()
            fused, report = convfuse.fuse(
                model, return_report=True, example_inputs=torch.randn(1, c_in, *sizes[-1])
            )
            times.append(time.perf_counter() - start)
            model64 = copy.deepcopy(model).double()
            fused64 = convfuse.fuse(model64)
            with torch.no_grad():
                for size in sizes:
                    x = torch.randn(2, c_in, *size)
                    worst32 = max(worst32, rel_error(model(x), fused(x)))
                    worst64 = max(worst64, rel_error(model64(x.double()), fused64(x.double())))
        fuse_time = statistics.median(times)
        convs = f"{count_convs(model)} -> {count_convs(fused)}"
        params = f"{report.before.params:,} -> {report.after.params:,}"
        macs = f"{report.before.macs:,} -> {report.after.macs:,}"
        print(
            f"{name:<11} {convs:>9} {params:>15} {macs:>23} "
            f"{worst32:>19.2e} {worst64:>9.1e} {fuse_time:>7.3f}"
        )


if __name__ == "__main__":
    main()
