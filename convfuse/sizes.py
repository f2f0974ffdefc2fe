"""Input sizes a model accepts, derived from its layers' geometry alone (no graph, no runtime).

A model with symbolic spatial dims must be checked at sizes it can run at. Each layer maps a
size ``n`` along one spatial dim to its output size, or rejects it:

    window (conv, pool):  extent = d*(k-1) + 1,  span = n + pad_begin + pad_end - extent
                          out = floor(span / s) + 1, rejected if span < 0; with ceil_mode
                          ceil(span / s) + 1, less 1 if the last window starts past the input
    SAME auto padding:    out = ceil(n / s), any n
    transposed conv:      out = s*(n-1) + output_padding + extent - pad_begin - pad_end
    multiple m:           n must be a multiple of m (a reshape to a fixed width, space-to-depth)
    scale f:              out = floor(out * f) (resize, depth-to-space)
    join (several reads): sizes other than 1 must agree (broadcasting); out = the largest

:func:`choose_sizes` picks two sizes per dim: the smallest size every layer accepts, and a
larger one of the other parity (odd and even exercise both stride phases and both border
cases) at which every window spans real data with every tap. Front ends describe their
layers as a list of :class:`Geometry` (the ONNX one in
:mod:`convfuse.frontends.onnx.geometry`); whatever the list leaves out, a runtime confirms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum

from .errors import NotRunnableError

__all__ = [
    "BATCH",
    "SIZE_LIMIT",
    "Fit",
    "Geometry",
    "NoSizeError",
    "SizeChoice",
    "Status",
    "choose_sizes",
    "fit",
    "group_status",
    "pick_first",
    "pick_second",
    "progression",
]

#: Batch size to check at where the batch is symbolic: 2, since a batch-mixing bug is invisible at 1.
BATCH = 2

#: Sizes are searched up to this along each dim.
SIZE_LIMIT = 1024


@dataclass(frozen=True)
class Geometry:
    """One layer as seen by a spatial size: per-dim tuples (empty = 1, or 0 for pads, in every dim).

    ``reads`` names the entries whose outputs this layer reads: indices of earlier entries, ``-1``
    for the model input; ``None`` (the default) reads the previous entry, the input for the first,
    so that a plain chain is just a list. A layer reading several entries joins them.
    """

    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    pads: tuple[tuple[int, int], ...] = ()  # (begin, end) per dim; negative crops (Pad)
    multiple: tuple[int, ...] = ()  # the input size must be a multiple of this
    ceil_mode: bool = False  # pooling: the last partial window counts
    same: bool = False  # auto_pad SAME_*: padding follows the size, output ceil(n / s)
    transposed: bool = False  # ConvTranspose: the adjoint window
    output_padding: tuple[int, ...] = ()
    scale: tuple[float, ...] = ()  # output = floor(output * scale) (Resize, DepthToSpace)
    output: tuple[int | None, ...] = ()  # a fixed output size whatever the input (global pooling)
    reads: tuple[int, ...] | None = None
    name: str = ""  # how messages name the layer

    def _at(self, values: tuple, dim: int, default: object) -> object:
        return values[dim] if dim < len(values) else default

    def out(self, dim: int, size: int) -> int | None:
        """The output size along ``dim`` for input ``size``, or ``None`` if the layer rejects it."""
        m = int(self._at(self.multiple, dim, 1))  # type: ignore[call-overload]
        if m > 1 and size % m:
            return None
        fixed = self._at(self.output, dim, None)
        if fixed is not None:
            return int(fixed)  # type: ignore[call-overload]
        k, s, d = (int(self._at(v, dim, 1)) for v in (self.kernel, self.stride, self.dilation))  # type: ignore[call-overload]
        begin, end = (int(x) for x in self._at(self.pads, dim, (0, 0)))  # type: ignore[attr-defined]
        extent = d * (k - 1) + 1
        if self.transposed:
            out = s * (size - 1) + int(self._at(self.output_padding, dim, 0)) + extent - begin - end  # type: ignore[call-overload]
        elif self.same:
            out = -(-size // s)
        else:
            span = size + begin + end - extent
            if span < 0 and not self.ceil_mode:  # ceil_mode: a window may overhang (out >= 1 below)
                return None
            out = (-(-span // s) if self.ceil_mode else span // s) + 1
            if self.ceil_mode and (out - 1) * s >= size + begin:
                out -= 1  # the last window must start inside the input or its begin padding
        out = math.floor(out * float(self._at(self.scale, dim, 1.0)))  # type: ignore[arg-type]
        return out if out >= 1 else None

    def covers(self, dim: int, size: int) -> bool:
        """Whether every tap of the window reads real input at some output position."""
        if self.transposed or self._at(self.output, dim, None) is not None:
            return True
        k, d = int(self._at(self.kernel, dim, 1)), int(self._at(self.dilation, dim, 1))  # type: ignore[call-overload]
        return size >= d * (k - 1) + 1


class Fit(IntEnum):
    """How a size fares through every layer along one dim."""

    REJECTED = 0  # some layer cannot run at it
    ACCEPTED = 1  # every layer runs
    COVERED = 2  # every layer runs and every window's taps all meet real data


class NoSizeError(NotRunnableError):
    """No size up to the search limit passes every layer along some dim."""


def fit(layers: Sequence[Geometry], dim: int, size: int) -> Fit:
    """Run ``size`` along spatial ``dim`` through ``layers`` in order (see :class:`Geometry`)."""
    sizes: list[int] = []
    covered = True
    for i, layer in enumerate(layers):
        reads = layer.reads if layer.reads is not None else (i - 1,)
        got = [size if r < 0 else sizes[r] for r in reads]
        big = {g for g in got if g != 1}
        if len(big) > 1:
            return Fit.REJECTED
        n = max(got, default=size)
        out = layer.out(dim, n)
        if out is None:
            return Fit.REJECTED
        covered = covered and layer.covers(dim, n)
        sizes.append(out)
    return Fit.COVERED if covered else Fit.ACCEPTED


def _rejecter(layers: Sequence[Geometry], dim: int, size: int) -> str:
    """The first layer that rejects ``size`` along ``dim``, for a message."""
    for k in range(1, len(layers) + 1):
        if fit(layers[:k], dim, size) is Fit.REJECTED:
            layer = layers[k - 1]
            return layer.name or f"layer {k - 1}"
    return "no layer"


Status = Callable[[int], Fit]


def pick_first(status: Status, start: int = 1, limit: int = SIZE_LIMIT) -> int | None:
    """The smallest size from ``start`` up to ``limit`` that ``status`` accepts."""
    return next((n for n in range(max(start, 1), limit + 1) if status(n) >= Fit.ACCEPTED), None)


def pick_second(status: Status, first: int, limit: int = SIZE_LIMIT) -> tuple[int, str]:
    """A size above ``first`` for a second check, and a note when it is not the ideal one.

    Ideal: the smallest accepted size of the other parity at which every window is covered.
    Failing that, the smallest covered size, then the smallest accepted one; ``first`` itself
    when no larger size is accepted.
    """
    above = range(first + 1, limit + 1)
    other = next((n for n in above if n % 2 != first % 2 and status(n) is Fit.COVERED), None)
    if other is not None:
        return other, ""
    parity = "even" if first % 2 else "odd"
    covered = next((n for n in above if status(n) is Fit.COVERED), None)
    if covered is not None:
        return covered, f"no {parity} size up to {limit} is accepted"
    accepted = next((n for n in above if status(n) >= Fit.ACCEPTED), None)
    if accepted is not None:
        return accepted, f"no size up to {limit} lets every kernel tap meet real input"
    return first, f"no size above {first} up to {limit} is accepted: checked at one size"


def progression(
    status: Status, start: int, steps: int, limit: int = SIZE_LIMIT, parity: int | None = None
) -> Iterator[int]:
    """Up to ``steps`` accepted sizes from ``start`` upward, for when a runtime refuses a derived
    size: the next few in turn, then roughly doubling (a size that must be a multiple of 32 is
    reached in a few steps). ``parity`` (0 even, 1 odd) keeps to sizes of that parity where any
    are accepted."""
    n, given = start, 0
    while given < steps and n <= limit:
        found = next(
            (
                m
                for m in range(n, limit + 1)
                if status(m) >= Fit.ACCEPTED and (parity is None or m % 2 == parity)
            ),
            None,
        )
        if found is None:
            if parity is None:
                return
            parity = None  # no size of that parity is left: any will do
            continue
        yield found
        given += 1
        n = found + 1 if given < 4 else 2 * found


@dataclass(frozen=True)
class SizeChoice:
    """Two sizes per spatial dim to check at, and notes on any that is not the ideal choice."""

    first: tuple[int, ...]  # the smallest size every layer accepts
    second: tuple[int, ...]  # larger, of the other parity where accepted, every tap covered
    notes: tuple[str, ...] = ()


def choose_sizes(
    layers: Sequence[Geometry],
    rank: int,
    *,
    tied: Sequence[Sequence[int]] = (),
    limit: int = SIZE_LIMIT,
) -> SizeChoice:
    """Sizes to check a model at, per spatial dim, from the geometry of its layers.

    ``layers`` describe the path from one input (see :class:`Geometry`), ``rank`` is the number
    of spatial dims (1, 2 or 3), ``tied`` lists groups of dims that must take one size (one
    symbol names them). Each dim (or group) gets the smallest size every layer accepts, and a
    second size from :func:`pick_second`. Raises :class:`NoSizeError` when some dim accepts no
    size up to ``limit``.

    The torch and ONNX front ends both call this; e.g. a chain of a 3x3 stride-2 conv and a
    4x4 pool, ``choose_sizes([Geometry(kernel=(3, 3), stride=(2, 2)), Geometry(kernel=(4, 4))], 2)``,
    gives ``first=(9, 9), second=(10, 10)``.
    """
    groups = [sorted(set(g)) for g in tied]
    grouped = {d for g in groups for d in g}
    groups += [[d] for d in range(rank) if d not in grouped]
    first: dict[int, int] = {}
    second: dict[int, int] = {}
    notes = []
    for group in groups:
        status = group_status([(layers, d) for d in group])
        n = pick_first(status, 1, limit)
        if n is None:
            dims = " and ".join(str(d) for d in group)
            raise NoSizeError(
                f"no size up to {limit} along spatial dim {dims} passes every layer "
                f"({_rejecter(layers, group[0], limit)} rejects {limit})"
            )
        m, note = pick_second(status, n, limit)
        if note:
            notes.append(f"spatial dim {' and '.join(str(d) for d in group)}: {note}")
        for d in group:
            first[d], second[d] = n, m
    return SizeChoice(
        tuple(first[d] for d in range(rank)), tuple(second[d] for d in range(rank)), tuple(notes)
    )


def group_status(members: Sequence[tuple[Sequence[Geometry], int]]) -> Status:
    """How a size fares when every ``(layers, dim)`` member takes it: the worst over them (dims
    one symbol names, in one input or several)."""
    return lambda n: min((fit(layers, d, n) for layers, d in members), default=Fit.COVERED)
