"""Worst float64 error of each algebra rule over random cases drawn by the test strategies.

Run from the repository root:  python -m benchmarks.algebra_precision [examples-per-rule]
"""

from __future__ import annotations

import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from convfuse.algebra import add, compose, compose_chain, concat
from convfuse.spec import ConvSpec
from tests.support.helpers import rel_err
from tests.support.strategies import conv_chain, conv_pair, input_for, parallel_branches


def _run_chain(chain: list[ConvSpec], x):
    for s in chain:
        x = s.apply(x)
    return x


def main(n: int) -> None:
    worst: dict[str, float] = {}

    def record(rule: str, err: float) -> None:
        worst[rule] = max(worst.get(rule, 0.0), err)

    @settings(max_examples=n, deadline=None, database=None)
    @given(pair=conv_pair(), extra=st.integers(0, 4))
    def seq(pair, extra):
        a, b = pair
        c = compose(a, b)
        x = input_for([[a, b]], a.in_channels, (extra,), seed=1)
        record("compose (B unpadded)", rel_err(b.apply(a.apply(x)), c.apply(x)))

    @settings(max_examples=n, deadline=None, database=None)
    @given(pair=conv_pair(b_padded=True, a_pointwise=True), extra=st.integers(0, 4))
    def case1(pair, extra):
        a, b = pair
        c = compose(a, b)
        x = input_for([[a, b]], a.in_channels, (extra,), seed=1)
        record("compose (case 1, B padded)", rel_err(b.apply(a.apply(x)), c.apply(x)))

    @settings(max_examples=n, deadline=None, database=None)
    @given(chain=conv_chain(), extra=st.integers(0, 3))
    def chains(chain, extra):
        c = compose_chain(chain)
        x = input_for([chain], chain[0].in_channels, (extra,), seed=1)
        record("compose_chain (3-4 convs)", rel_err(_run_chain(chain, x), c.apply(x)))

    @settings(max_examples=n, deadline=None, database=None)
    @given(branches=parallel_branches(), extra=st.integers(0, 3))
    def sums(branches, extra):
        x = input_for([[b] for b in branches], branches[0].in_channels, (extra,), seed=1)
        record("add (parallel sum)", rel_err(sum(b.apply(x) for b in branches), add(branches).apply(x)))
        import torch

        ref = torch.cat([b.apply(x) for b in branches], 1)
        record("concat", rel_err(ref, concat(branches).apply(x)))

    for test in (seq, case1, chains, sums):
        test()
    print(f"worst float64 relative error over {n} random cases per rule (max |err| / max |output|):")
    for rule, err in worst.items():
        print(f"  {rule:<28} {err:.2e}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
