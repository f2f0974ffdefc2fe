"""Hypothesis strategies for transposed convs, and torch's conv_transpose as the oracle."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

from convfuse.algebra import identity
from convfuse.spec import ConvSpec
from convfuse.transpose import ConvTransposeSpec

__all__ = [
    "MAX_KERNEL",
    "TransposeGeometry",
    "branches",
    "geometry",
    "min_input",
    "np_rand",
    "phase_balanced",
    "pointwise",
    "rim_cropped",
    "run_transpose",
    "transpose_spec",
    "input_for",
]

MAX_KERNEL = {1: 5, 2: 5, 3: 3}
_CONV_T = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def np_rand(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def run_transpose(spec: ConvTransposeSpec, x: torch.Tensor) -> torch.Tensor:
    """``spec`` on ``x`` by torch: natively where torch's symmetric padding can say it, otherwise
    torch's uncropped conv_transpose, zero-extended and cropped per the definition."""
    w = torch.from_numpy(np.ascontiguousarray(spec.weight)).to(x.dtype)
    bias = None if spec.bias is None else torch.from_numpy(np.ascontiguousarray(spec.bias)).to(x.dtype)
    conv = _CONV_T[spec.ndim - 1]
    one = [b - e + op for (b, e), op in zip(spec.pads, spec.output_padding)]
    if all(b == e for b, e in spec.pads) and all(
        0 <= o < max(s, d) for o, s, d in zip(one, spec.stride, spec.dilation)
    ):
        return conv(x, w, bias, spec.stride, [b for b, _ in spec.pads], one, spec.groups, spec.dilation)
    z = conv(x, w, None, spec.stride, 0, 0, spec.groups, spec.dilation)
    out = spec.output_size(x.shape[2:])
    grow = [max(0, b + o - z.shape[2 + i]) for i, ((b, _), o) in enumerate(zip(spec.pads, out))]
    z = F.pad(z, [p for g in reversed(grow) for p in (0, g)])
    for i, ((b, _), o) in enumerate(zip(spec.pads, out)):
        z = z.narrow(2 + i, b, o)
    return z if bias is None else z + bias.reshape(-1, *([1] * spec.ndim))


@dataclass(frozen=True)
class TransposeGeometry:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    output_padding: tuple[int, ...]


@st.composite
def geometry(draw: st.DrawFn, n: int, max_stride: int = 3, symmetric: bool = False) -> TransposeGeometry:
    """Kernels 1-5 (1-3 in 3D), strides 1-3, dilations 1-2, crops up to the extent, torch-valid op."""
    kernel = tuple(draw(st.integers(1, MAX_KERNEL[n])) for _ in range(n))
    stride = tuple(draw(st.integers(1, max_stride)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    pads = []
    for k, d in zip(kernel, dilation):
        b = draw(st.integers(0, d * (k - 1) + 1))
        pads.append((b, b if symmetric else draw(st.integers(0, d * (k - 1) + 1))))
    op = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    return TransposeGeometry(kernel, stride, dilation, tuple(pads), op)


@st.composite
def transpose_spec(
    draw: st.DrawFn,
    n: int | None = None,
    ci: int | None = None,
    co: int | None = None,
    max_stride: int = 3,
    symmetric: bool = False,
) -> ConvTransposeSpec:
    """A float64 transposed conv: 1D-3D, groups dividing both channel counts, bias on or off."""
    n = draw(st.integers(1, 3)) if n is None else n
    g = draw(st.sampled_from([1, 1, 2, 3]))
    ci = g * draw(st.integers(1, 2)) if ci is None else ci
    co = g * draw(st.integers(1, 2)) if co is None else co
    if ci % g or co % g:
        g = math.gcd(ci, co)
    geo = draw(geometry(n, max_stride, symmetric))
    seed = draw(st.integers(0, 2**20))
    return ConvTransposeSpec(
        weight=np_rand(ci, co // g, *geo.kernel, seed=seed),
        bias=np_rand(co, seed=seed + 1) if draw(st.booleans()) else None,
        stride=geo.stride,
        dilation=geo.dilation,
        groups=g,
        pads=geo.pads,
        output_padding=geo.output_padding,
    )


@st.composite
def pointwise(draw: st.DrawFn, ci: int, co: int, n: int, bias: bool | None = None) -> ConvSpec:
    """A 1x1 conv (torch float64 ConvSpec) with any groups dividing both sides."""
    g = draw(st.sampled_from([d for d in range(1, min(ci, co) + 1) if ci % d == 0 and co % d == 0]))
    seed = draw(st.integers(0, 2**20))
    with_bias = draw(st.booleans()) if bias is None else bias
    weight = torch.from_numpy(np_rand(co, ci // g, *([1] * n), seed=seed))
    return ConvSpec(weight, torch.from_numpy(np_rand(co, seed=seed + 1)) if with_bias else None, groups=g)


def min_input(spec: ConvTransposeSpec) -> tuple[int, ...]:
    """Smallest spatial input size with a non-empty output."""
    return tuple(1 + max(0, -(sl // s)) for s, sl in zip(spec.stride, spec.slack))  # (n-1)*s + sl >= 0


def input_for(spec: ConvTransposeSpec, extra: tuple[int, ...], seed: int, batch: int = 2) -> torch.Tensor:
    sizes = [m + extra[i % len(extra)] for i, m in enumerate(min_input(spec))]
    return torch.from_numpy(np_rand(batch, spec.in_channels, *sizes, seed=seed))


@st.composite
def rim_cropped(draw: st.DrawFn) -> ConvTransposeSpec:
    """Stride 1 with both crops covering the rim (pb >= d(k-1), pe - op >= d(k-1)): one tap set."""
    n = draw(st.integers(1, 3))
    k = [draw(st.integers(1, MAX_KERNEL[n])) for _ in range(n)]
    d = [draw(st.integers(1, 2)) for _ in range(n)]
    op = [draw(st.integers(0, dd - 1)) for dd in d]
    pads = [
        (dd * (kk - 1) + draw(st.integers(0, 1)), dd * (kk - 1) + o + draw(st.integers(0, 1)))
        for kk, dd, o in zip(k, d, op)
    ]
    ci, co, seed = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 2**20))
    return ConvTransposeSpec(
        np_rand(ci, co, *k, seed=seed),
        np_rand(co, seed=seed + 1),
        dilation=tuple(d),
        pads=tuple(pads),
        output_padding=tuple(op),
    )


@st.composite
def phase_balanced(draw: st.DrawFn) -> ConvTransposeSpec:
    """Stride s > 1, kernel m*s, crops >= k - s: every output gets one full phase class of taps,
    and the weights are drawn so that every class sums to the same value per channel pair."""
    n = draw(st.integers(1, 2))
    s = [draw(st.integers(2, 3)) for _ in range(n)]
    k = [ss * draw(st.integers(1, 2)) for ss in s]
    op = [draw(st.integers(0, ss - 1)) for ss in s]
    pads = [
        (kk - ss + draw(st.integers(0, 2)), kk - ss + o + draw(st.integers(0, 2)))
        for kk, ss, o in zip(k, s, op)
    ]
    ci, co, seed = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 2**20))
    w = np_rand(ci, co, *k, seed=seed)
    target = np_rand(ci, co, seed=seed + 2)
    for phase in itertools.product(*[range(ss) for ss in s]):
        cls = (slice(None), slice(None)) + tuple(slice(r, None, ss) for r, ss in zip(phase, s))
        block = w[cls]
        last = (slice(None), slice(None)) + (-1,) * n
        block[last] = 0
        block[last] = target - block.reshape(ci, co, -1).sum(axis=2)
        w[cls] = block
    return ConvTransposeSpec(
        w, np_rand(co, seed=seed + 1), stride=tuple(s), pads=tuple(pads), output_padding=tuple(op)
    )


@st.composite
def branches(draw: st.DrawFn, with_convs: bool = False) -> list[ConvTransposeSpec | ConvSpec]:
    """2-4 transposed convs of one input on one grid (equal stride and slack), groups and bias
    drawn per branch; ``with_convs`` adds stride-1 zero-padded convs (1x1, spatial, identity)."""
    n = draw(st.integers(1, 3))
    ci, co = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    if with_convs and draw(st.booleans()):
        co = ci  # room for an identity branch
    stride = (1,) * n if with_convs else tuple(draw(st.integers(1, 3)) for _ in range(n))
    slack = tuple(draw(st.integers(-2, 3)) for _ in range(n))
    seed = draw(st.integers(0, 2**20))
    out: list[ConvTransposeSpec | ConvSpec] = []
    for i in range(draw(st.integers(2, 4))):
        groups = draw(st.sampled_from([g for g in (1, 2) if ci % g == 0 and co % g == 0]))
        k = [draw(st.integers(1, MAX_KERNEL[n])) for _ in range(n)]
        d = [draw(st.integers(1, 2)) for _ in range(n)]
        bias = np_rand(co, seed=seed + 3 * i + 1) if draw(st.booleans()) else None
        if with_convs and i > 0 and draw(st.booleans()):
            if co == ci and draw(st.booleans()):
                assume(all(sl == 0 for sl in slack))
                out.append(identity(ci, n, torch.float64))
                continue
            pads = []
            for kk, dd, sl in zip(k, d, slack):  # b + e - d(k-1) = slack
                b = draw(st.integers(0, max(0, sl + dd * (kk - 1))))
                pads.append((b, sl + dd * (kk - 1) - b))
            assume(all(e >= 0 for _, e in pads))
            w = torch.from_numpy(np_rand(co, ci // groups, *k, seed=seed + 3 * i))
            out.append(
                ConvSpec(
                    w,
                    None if bias is None else torch.from_numpy(bias),
                    dilation=tuple(d),
                    groups=groups,
                    pads=tuple(pads),
                )
            )
            continue
        pads, ops = [], []
        for kk, dd, s, sl in zip(k, d, stride, slack):  # d(k-1) - pb - pe + op = slack
            top = min(dd * (kk - 1) + 1, dd * (kk - 1) - sl + max(s, dd) - 1)  # keeps op < max(s, d)
            assume(top >= 0)
            pb = draw(st.integers(0, top))
            end = dd * (kk - 1) - pb - sl  # pe - op
            op = draw(st.integers(max(0, -end), max(s, dd) - 1))
            pads.append((pb, end + op))
            ops.append(op)
        w = np_rand(ci, co // groups, *k, seed=seed + 3 * i)
        out.append(ConvTransposeSpec(w, bias, stride, tuple(d), groups, tuple(pads), tuple(ops)))
    assume(any(isinstance(b, ConvTransposeSpec) for b in out))
    return out
