"""Worst float64 error of the border-correction rule (issue 14) over random case-2 pairs drawn by
the test strategy, with torch running A then B as the oracle.

Run from the repository root:  python -m benchmarks.border_precision [cases]
"""

from __future__ import annotations

import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convfuse.border import BorderMerge, border_ring, compose_across_border, ring_from_ones
from tests.support.border_cases import case2_pair, input_sizes, merge_error, oracle_ring


def main(n: int) -> None:
    worst = {
        "merge: C'(x) + ring vs A then B": 0.0,
        "static ring vs torch Bnb(pad0(bA*1)) - Kint": 0.0,
        "ones-map ring (A's grid) vs static": 0.0,
        "ones-map ring (x's grid) vs static": 0.0,
    }
    count = {"cases": 0, "sizes": 0, "1D": 0, "2D": 0, "3D": 0}

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        pair=case2_pair(),
        extras=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4)), min_size=1, max_size=3),
    )
    def run(pair, extras):
        a, b = pair
        merge = compose_across_border(a, b)
        assert isinstance(merge, BorderMerge), merge
        count["cases"] += 1
        count[f"{a.ndim}D"] += 1
        for spatial in input_sizes(a, b, [(0,), *extras]):
            count["sizes"] += 1
            ring = border_ring(merge, spatial)
            scale = max(float(np.abs(ring).max()), float(np.abs(merge.interior).max()), 1e-300)
            errors = (
                merge_error(a, b, merge, spatial, seed=sum(spatial)),
                float(np.abs(oracle_ring(a, b, merge, spatial).numpy() - ring).max()) / scale,
                float(np.abs(ring_from_ones(merge, spatial) - ring).max()) / scale,
                float(np.abs(ring_from_ones(merge, spatial, on_input_grid=True) - ring).max()) / scale,
            )
            for key, err in zip(worst, errors):
                worst[key] = max(worst[key], err)

    run()
    print(
        f"{count['cases']} case-2 pairs ({count['1D']} 1D, {count['2D']} 2D, {count['3D']} 3D), "
        f"{count['sizes']} input sizes; worst float64 relative error:"
    )
    for key, err in worst.items():
        print(f"  {key:<46} {err:.2e}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
