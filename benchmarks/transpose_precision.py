"""Worst float64 error of each transposed-conv rule over random cases drawn by the test strategies,
with torch's conv_transpose as the oracle.

Run from the repository root:  python -m benchmarks.transpose_precision [examples-per-rule]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convfuse.algebra import ChannelAffine
from convfuse.transpose import (
    ConvTransposeSpec,
    add_transposed,
    affine_then_transpose,
    conv_as_transpose,
    pointwise_then_transpose,
    transpose_then_affine,
    transpose_then_pointwise,
)
from tests.support.helpers import rel_err
from tests.support.transpose_cases import (
    branches,
    input_for,
    min_input,
    np_rand,
    phase_balanced,
    pointwise,
    rim_cropped,
    run_transpose,
    transpose_spec,
)


def _run(branch, x: torch.Tensor) -> torch.Tensor:
    return run_transpose(branch, x) if isinstance(branch, ConvTransposeSpec) else branch.apply(x)


def main(n: int) -> None:
    worst: dict[str, float] = {}
    cases: dict[str, int] = {}

    def record(rule: str, err: float) -> None:
        worst[rule] = max(worst.get(rule, 0.0), err)
        cases[rule] = cases.get(rule, 0) + 1

    run = settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )

    @run
    @given(t=transpose_spec(), seed=st.integers(0, 2**20), extra=st.integers(0, 3))
    def affine_after(t, seed, extra):
        affine = ChannelAffine(
            torch.from_numpy(np_rand(t.out_channels, seed=seed)),
            torch.from_numpy(np_rand(t.out_channels, seed=seed + 1)),
        )
        x = input_for(t, (extra,), seed=1)
        view = (1, -1) + (1,) * t.ndim
        ref = run_transpose(t, x) * torch.from_numpy(affine.scale).view(view) + torch.from_numpy(
            affine.shift
        ).view(view)
        record(
            "transpose_then_affine (BN after)",
            rel_err(ref, run_transpose(transpose_then_affine(t, affine), x)),
        )

    @run
    @given(data=st.data(), t=transpose_spec(), extra=st.integers(0, 3))
    def pointwise_after(data, t, extra):
        b = data.draw(pointwise(t.out_channels, data.draw(st.integers(1, 4)) * t.groups, t.ndim))
        x = input_for(t, (extra,), seed=2)
        record(
            "transpose_then_pointwise (1x1 after)",
            rel_err(b.apply(run_transpose(t, x)), run_transpose(transpose_then_pointwise(t, b), x)),
        )

    @run
    @given(data=st.data(), t=transpose_spec(), extra=st.integers(0, 3))
    def pointwise_before(data, t, extra):
        a = data.draw(pointwise(data.draw(st.integers(1, 3)) * t.groups, t.in_channels, t.ndim, bias=False))
        x = torch.from_numpy(np_rand(2, a.in_channels, *[m + extra for m in min_input(t)], seed=3))
        record(
            "pointwise_then_transpose (1x1 before)",
            rel_err(run_transpose(t, a.apply(x)), run_transpose(pointwise_then_transpose(a, t), x)),
        )

    def shifted(rule: str, t: ConvTransposeSpec, seed: int, extra: int) -> None:
        bn = ChannelAffine(
            torch.from_numpy(np_rand(t.in_channels, seed=seed)),
            torch.from_numpy(np_rand(t.in_channels, seed=seed + 1)),
        )
        merged = affine_then_transpose(bn, t)
        assert isinstance(merged, ConvTransposeSpec), merged
        x = torch.from_numpy(np_rand(2, t.in_channels, *[m + extra for m in min_input(t)], seed=4))
        view = (1, -1) + (1,) * t.ndim
        record(
            rule,
            rel_err(
                run_transpose(
                    t, x * torch.from_numpy(bn.scale).view(view) + torch.from_numpy(bn.shift).view(view)
                ),
                run_transpose(merged, x),
            ),
        )

    @run
    @given(t=rim_cropped(), seed=st.integers(0, 2**20), extra=st.integers(0, 4))
    def shift_rim(t, seed, extra):
        shifted("affine_then_transpose (BN shift, rim cropped)", t, seed, extra)

    @run
    @given(t=phase_balanced(), seed=st.integers(0, 2**20), extra=st.integers(0, 4))
    def shift_phases(t, seed, extra):
        shifted("affine_then_transpose (BN shift, phases balanced)", t, seed, extra)

    @run
    @given(parts=branches(), extra=st.integers(0, 3))
    def sums(parts, extra):
        t = parts[0]
        x = torch.from_numpy(np_rand(2, t.in_channels, *[m + extra for m in min_input(t)], seed=5))
        record(
            "add_transposed (transposed branches)",
            rel_err(sum(_run(p, x) for p in parts), run_transpose(add_transposed(parts), x)),
        )

    @run
    @given(parts=branches(with_convs=True), extra=st.integers(0, 3))
    def sums_with_convs(parts, extra):
        t = next(p for p in parts if isinstance(p, ConvTransposeSpec))
        x = torch.from_numpy(np_rand(2, t.in_channels, *[m + extra + 1 for m in min_input(t)], seed=6))
        merged = add_transposed(parts)
        record(
            "add_transposed (+ conv/identity branches)",
            rel_err(sum(_run(p, x) for p in parts), run_transpose(merged, x)),
        )
        for p in parts:
            if not isinstance(p, ConvTransposeSpec):
                record("conv_as_transpose", rel_err(p.apply(x), run_transpose(conv_as_transpose(p), x)))

    for test in (
        affine_after,
        pointwise_after,
        pointwise_before,
        shift_rim,
        shift_phases,
        sums,
        sums_with_convs,
    ):
        test()
    print(f"worst float64 relative error per rule, up to {n} random cases each (max |err| / max |output|):")
    for rule, err in worst.items():
        print(f"  {rule:<50} {err:.2e}   ({cases[rule]} cases)")


if __name__ == "__main__":
    np.seterr(all="raise")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
