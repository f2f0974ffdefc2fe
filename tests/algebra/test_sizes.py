"""convfuse.sizes: which input sizes a list of layer geometries accepts, against torch as the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convfuse.sizes import (
    Fit,
    Geometry,
    NoSizeError,
    choose_sizes,
    fit,
    group_status,
    pick_second,
    progression,
)

G = Geometry


def test_docstring_example_conv_then_pool() -> None:
    """3x3 stride-2 conv then a 4x4 pool: the pool needs 4, so the conv's input needs 9."""
    choice = choose_sizes([G(kernel=(3, 3), stride=(2, 2)), G(kernel=(4, 4))], 2)
    assert choice.first == (9, 9) and choice.second == (10, 10) and not choice.notes
    assert fit([G(kernel=(3, 3), stride=(2, 2)), G(kernel=(4, 4))], 0, 8) is Fit.REJECTED


def test_padded_strided_stack_runs_at_1_and_checks_where_every_tap_meets_data() -> None:
    """Five 3x3 stride-2 pad-1 stages then a 3x3 conv (a ResNet-like stack): 1 runs, but only
    the centre taps then see data; the second size is where the last conv sees 3 rows."""
    stack = [G(kernel=(3,), stride=(2,), pads=((1, 1),))] * 5 + [G(kernel=(3,), pads=((1, 1),))]
    choice = choose_sizes(stack, 1)
    assert choice.first == (1,)
    assert choice.second == (66,)  # 66 -> 33 -> 17 -> 9 -> 5 -> 3
    assert fit(stack, 0, 65) is Fit.COVERED  # 65 -> ... -> 3 too, but odd like the first
    assert fit(stack, 0, 64) is Fit.ACCEPTED  # 64 -> ... -> 2: the last conv's outer taps see only padding


def test_dims_are_independent_and_tied_dims_share_a_size() -> None:
    layers = [G(kernel=(5, 1)), G(kernel=(1, 2), stride=(1, 2))]
    assert choose_sizes(layers, 2) == choose_sizes(layers, 2, tied=())
    free = choose_sizes(layers, 2)
    assert free.first == (5, 2) and free.second == (6, 3)
    tied = choose_sizes(layers, 2, tied=[(0, 1)])
    assert tied.first == (5, 5) and tied.second == (6, 6)


def test_a_multiple_allows_one_parity_only_and_says_so() -> None:
    choice = choose_sizes([G(multiple=(1, 8))], 2)
    assert choice.first == (1, 8) and choice.second == (2, 16)
    assert choice.notes == ("spatial dim 1: no odd size up to 1024 is accepted",)


def test_join_needs_equal_sizes_or_one() -> None:
    """y = conv_a(x) + conv_b(x): 3-tap valid (n - 2) and 3-tap padded (n) agree only where the
    valid one is 1 and broadcasts (n = 3); a global pool (1) always broadcasts."""
    mismatch = [G(kernel=(3,)), G(kernel=(3,), pads=((1, 1),), reads=(-1,)), G(reads=(0, 1))]
    assert [n for n in range(1, 40) if fit(mismatch, 0, n) is not Fit.REJECTED] == [3]
    squeeze = [G(kernel=(3,)), G(output=(1,), reads=(0,)), G(reads=(0, 1))]
    assert choose_sizes(squeeze, 1).first == (3,)


def test_no_size_in_the_limit_raises() -> None:
    with pytest.raises(
        NoSizeError, match=r"no size up to 40 along spatial dim 0 passes every layer \(big rejects 40\)"
    ):
        choose_sizes([G(), G(kernel=(50,), name="big")], 1, limit=40)


def test_transposed_scale_and_fixed_output() -> None:
    up = G(kernel=(4,), stride=(2,), pads=((1, 1),), transposed=True)  # doubles the size
    assert [up.out(0, n) for n in (1, 2, 5)] == [2, 4, 10]
    assert G(scale=(2.0,)).out(0, 3) == 6 and G(output=(1,)).out(0, 17) == 1
    # U-Net step: stride-2 down, x2 up, joined with the input: only even sizes agree.
    unet = [G(kernel=(2,), stride=(2,)), G(scale=(2.0,)), G(reads=(-1, 1))]
    choice = choose_sizes(unet, 1)
    assert choice.first == (2,) and choice.second == (4,) and "no odd size" in choice.notes[0]


def test_pick_second_prefers_covered_other_parity() -> None:
    status = group_status([([G(kernel=(3,), pads=((1, 1),))], 0)])
    assert pick_second(status, 1) == (4, "")  # 2 runs, but the 3-tap window needs 3
    only = group_status([([G(output=(1,), multiple=(7,))], 0)])
    assert pick_second(only, 7, limit=10) == (7, "no size above 7 up to 10 is accepted: checked at one size")


def test_progression_steps_then_doubles_and_keeps_parity() -> None:
    free = group_status([([G()], 0)])
    assert list(progression(free, 1, 8)) == [1, 2, 3, 4, 8, 16, 32, 64]
    assert list(progression(free, 3, 5, parity=1)) == [3, 5, 7, 9, 19]
    evens = group_status([([G(multiple=(2,))], 0)])
    assert list(progression(evens, 3, 3, parity=1)) == [4, 6, 8]  # no odd size: any will do


# --------------------------------------------------------------------------- torch as the oracle
@st.composite
def _layers(draw: st.DrawFn) -> list[tuple[str, dict]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        k, s = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        if draw(st.booleans()):
            out.append(
                (
                    "conv",
                    dict(
                        k=k,
                        s=s,
                        d=draw(st.integers(1, 3)),
                        pb=draw(st.integers(0, 2)),
                        pe=draw(st.integers(0, 2)),
                    ),
                )
            )
        else:
            out.append(("pool", dict(k=k, s=s, p=draw(st.integers(0, k // 2)), ceil=draw(st.booleans()))))
    return out


def _geometry(kind: str, a: dict) -> Geometry:
    if kind == "conv":
        return G(kernel=(a["k"],), stride=(a["s"],), dilation=(a["d"],), pads=((a["pb"], a["pe"]),))
    return G(kernel=(a["k"],), stride=(a["s"],), pads=((a["p"], a["p"]),), ceil_mode=a["ceil"])


def _torch_runs(layers: list[tuple[str, dict]], n: int) -> bool:
    x = torch.zeros(1, 1, n)
    try:
        for kind, a in layers:
            if kind == "conv":
                x = F.conv1d(
                    F.pad(x, (a["pb"], a["pe"])), torch.ones(1, 1, a["k"]), stride=a["s"], dilation=a["d"]
                )
            else:
                x = F.max_pool1d(x, a["k"], a["s"], a["p"], ceil_mode=a["ceil"])
    except RuntimeError:
        return False
    return x.numel() > 0


@settings(max_examples=80)
@given(_layers())
def test_accepted_sizes_are_exactly_those_torch_runs(layers: list[tuple[str, dict]]) -> None:
    geometry = [_geometry(kind, a) for kind, a in layers]
    for n in range(1, 48):
        assert (fit(geometry, 0, n) >= Fit.ACCEPTED) == _torch_runs(layers, n), n
    try:
        choice = choose_sizes(geometry, 1, limit=200)
    except NoSizeError:
        assert not any(_torch_runs(layers, n) for n in range(1, 48))
        return
    (first,), (second,) = choice.first, choice.second
    assert _torch_runs(layers, first) and not any(_torch_runs(layers, n) for n in range(1, first))
    assert second > first and _torch_runs(layers, second)
    if not choice.notes:
        assert second % 2 != first % 2
