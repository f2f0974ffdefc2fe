"""What the ``latency`` policy times, framework-neutrally, and the meter that keeps the timings.

Core types only: no ONNX Runtime here. A :class:`Candidate` is a merge to time: the original
layers as :class:`~convfuse.spec.ConvSpec` values run one after another (a :class:`Parallel` for
branches that are summed), the merged conv, and the input shape. A :class:`Timer` answers a
candidate with a :class:`Timing`; the ONNX Runtime one is :class:`convfuse.latency.OrtTimer`,
which the front ends pass in, and tests inject fakes. :class:`LatencyMeter` caches timings per
geometry (identical blocks are timed once), fills in unknown input dims (:data:`DEFAULT_BATCH`,
:data:`DEFAULT_SPATIAL`), and stops timing once its total budget is spent; the judge
(:class:`convfuse.policy.Judge`) then falls back to the flops rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from .errors import ConvfuseError, InvalidOptionError
from .spec import ConvSpec, is_shape_only

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BUDGET",
    "DEFAULT_MARGIN",
    "DEFAULT_SPATIAL",
    "LATENCY_DEVICES",
    "Block",
    "Candidate",
    "DescribedTimer",
    "LatencyMeter",
    "Parallel",
    "Shape",
    "Timer",
    "Timing",
    "TimingError",
    "advance",
    "affine_parts",
    "is_per_channel",
    "ms",
]

#: Devices the latency policy can time on.
LATENCY_DEVICES = ("cpu", "cuda")
#: Seconds of timing per fuse pass; later candidates are judged by the flops rule.
DEFAULT_BUDGET = 30.0
#: A merge is kept when ``merged <= original * (1 + margin)``: within timing noise, removing
#: layers wins the tie.
DEFAULT_MARGIN = 0.05
#: Batch used when the model's batch dim is symbolic.
DEFAULT_BATCH = 1
#: Spatial size per dim used when the model's spatial dims are symbolic (about 3k positions).
DEFAULT_SPATIAL = {1: 3136, 2: 56, 3: 16}

Shape = tuple[int | None, ...]


@dataclass(frozen=True, eq=False)
class Parallel:
    """Branches that all read the same tensor, summed; an empty branch is the tensor itself."""

    branches: tuple[Block, ...]


Block = tuple[ConvSpec | Parallel, ...]


@dataclass(frozen=True, eq=False)
class Candidate:
    """A merge to time: ``original`` layers on an ``input_shape`` tensor against ``merged``.

    ``input_shape`` is ``[N, C, *spatial]``; ``None`` entries are unknown (symbolic) and get
    the defaults. ``merged`` may be a shape-only spec (:func:`convfuse.spec.shape_only`): timing
    needs shapes, not values. ``dtype`` is the model's element type (a numpy dtype, or the name of
    one numpy lacks, such as ``"bfloat16"``, which has no timing model).
    """

    original: Block
    merged: ConvSpec
    input_shape: Shape
    dtype: np.dtype | str = np.dtype(np.float32)

    def resolved(self) -> tuple[Candidate, tuple[bool, bool]]:
        """This candidate with unknown dims filled in, and whether the batch and whether a
        spatial dim took its default."""
        ndim = self.merged.ndim
        shape = tuple(self.input_shape)
        if len(shape) != ndim + 2:
            shape = (None, self.merged.in_channels) + (None,) * ndim
        batch = shape[0] if shape[0] else DEFAULT_BATCH
        spatial = tuple(d if d else DEFAULT_SPATIAL[ndim] for d in shape[2:])
        full = (batch, self.merged.in_channels, *spatial)
        return replace(self, input_shape=full), (not shape[0], any(not d for d in shape[2:]))

    def known_shape(self) -> tuple[int, ...]:
        """``input_shape`` as ints; :class:`TimingError` when a dim is unknown (see :meth:`resolved`)."""
        if any(d is None for d in self.input_shape):
            raise TimingError(f"timing needs a known input shape, got {list(self.input_shape)}")
        return tuple(int(d) for d in self.input_shape if d is not None)

    def key(self) -> tuple[object, ...]:
        """What the timing depends on: shapes, geometry, the kind of each layer; not values."""
        return (tuple(self.input_shape), str(self.dtype), _block_key(self.original), _conv_key(self.merged))


class Timing(NamedTuple):
    """Median seconds per run of the original layers and of the merged conv."""

    original: float
    merged: float


@runtime_checkable
class Timer(Protocol):
    """Times a candidate whose input shape is fully known; raises :class:`TimingError` when it
    cannot. A plain function of a candidate is a timer."""

    def __call__(self, candidate: Candidate, /) -> Timing: ...


@runtime_checkable
class DescribedTimer(Timer, Protocol):
    """A timer that can say how it times, for the report (``ONNX Runtime cpu, 1 thread(s), ...``)."""

    def describe(self) -> str: ...


class TimingError(ConvfuseError):
    """A timing model could not be built or run (an element type the runtime has no kernel for)."""


# --------------------------------------------------------------------------- layer kinds
def is_per_channel(spec: ConvSpec) -> bool:
    """A depthwise 1x1 conv at stride 1: a per-channel affine (with a zero pad around it)."""
    return (
        spec.is_pointwise
        and spec.groups == spec.in_channels == spec.out_channels
        and all(s == 1 for s in spec.stride)
    )


def affine_parts(spec: ConvSpec) -> tuple[bool, bool]:
    """Whether a per-channel spec needs its ``Mul`` and its ``Add`` (a shape-only one needs both)."""
    if is_shape_only(spec.weight):
        return True, spec.bias is not None
    scale = not bool(np.all(spec.weight == 1))
    shift = spec.bias is not None and not is_shape_only(spec.bias) and spec.has_nonzero_bias()
    return scale, shift


def _layer_kind(spec: ConvSpec) -> str:
    if not is_per_channel(spec):
        return "conv"
    scale, shift = affine_parts(spec)
    return f"pad{int(spec.is_padded)}-mul{int(scale)}-add{int(shift)}"


def _conv_key(spec: ConvSpec) -> tuple[object, ...]:
    return (
        tuple(spec.weight.shape),
        spec.stride,
        spec.dilation,
        spec.groups,
        spec.pads,
        spec.bias is not None,
    )


def _block_key(block: Block) -> tuple[object, ...]:
    out: list[object] = []
    for item in block:
        if isinstance(item, Parallel):
            out.append(("sum", tuple(_block_key(b) for b in item.branches)))
        else:
            out.append((_layer_kind(item), _conv_key(item)))
    return tuple(out)


def advance(shape: Shape, spec: ConvSpec) -> Shape:
    """The shape after ``spec``: its output channels, and each known spatial dim it maps."""
    spatial = tuple(
        None if n is None else (n + b + e - x) // s + 1
        for n, (b, e), x, s in zip(shape[2:], spec.pads, spec.extent, spec.stride)
    )
    return (shape[0], spec.out_channels, *spatial)


# --------------------------------------------------------------------------- the meter
def ms(seconds: float) -> str:
    """Seconds as milliseconds with three significant digits."""
    return f"{seconds * 1e3:.3g} ms"


def check_device(device: str) -> str:
    """``device`` when the latency policy can time on it, else :class:`InvalidOptionError`."""
    if device not in LATENCY_DEVICES:
        raise InvalidOptionError(
            f"latency device must be one of {', '.join(LATENCY_DEVICES)}, got {device!r}"
        )
    return device


class LatencyMeter:
    """Timings of candidates: cached per geometry, within a total budget, with their notes.

    ``timer`` answers each new geometry (the front ends pass :class:`convfuse.latency.OrtTimer`;
    tests inject a fake one), and ``clock`` measures what the budget counts. ``device`` names
    where the timer runs, for the decisions' messages. ``margin`` is the tolerance of the
    decision (:func:`convfuse.policy.judge_latency`).
    """

    def __init__(
        self,
        device: str = "cpu",
        budget: float = DEFAULT_BUDGET,
        margin: float = DEFAULT_MARGIN,
        *,
        timer: Timer,
        clock: Callable[[], float] = time.perf_counter,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        check_device(device)
        if budget < 0 or margin < 0:
            raise InvalidOptionError(f"latency budget and margin must be >= 0, got {budget} and {margin}")
        self.device = device
        self.budget = budget
        self.margin = margin
        self.timer = timer
        self.clock = clock
        self.progress: Callable[[str], None] = progress or (lambda message: None)
        self.spent = 0.0
        self.timed = 0  # candidates timed
        self.reused = 0  # answers from the cache
        self.default_batch = 0  # timed on the default batch
        self.default_spatial = 0  # timed on default spatial dims
        self.over_budget = 0  # asked after the budget was spent
        self.failures: list[str] = []
        self._cache: dict[tuple[object, ...], Timing | str] = {}

    def measure(self, candidate: Candidate) -> Timing | str:
        """The candidate's timing, or a phrase saying why it was not timed."""
        full, defaulted = candidate.resolved()
        key = full.key()
        found = self._cache.get(key)
        if found is not None:
            self.reused += 1
            return found
        if self.spent >= self.budget:
            self.over_budget += 1
            return f"latency budget of {self.budget:g} s spent"
        start = self.clock()
        try:
            result: Timing | str = self.timer(full)
        except TimingError as exc:
            result = f"not timed ({exc})"
            self.failures.append(str(exc))
        self.spent += self.clock() - start
        self._cache[key] = result
        if isinstance(result, Timing):
            self.timed += 1
            self.default_batch += int(defaulted[0])
            self.default_spatial += int(defaulted[1])
            self.progress(
                f"latency: timed candidate {self.timed} on {list(full.input_shape)}: "
                f"{ms(result.original)} -> {ms(result.merged)} ({self.spent:.1f} of {self.budget:g} s)"
            )
        return result

    def notes(self) -> list[str]:
        """What the report should say about the timings (nothing when no candidate was judged)."""
        if not (self.timed or self.reused or self.over_budget or self.failures):
            return []
        how = self.timer.describe() if isinstance(self.timer, DescribedTimer) else "an injected timer"
        out = [
            f"latency: timed {self.timed} candidate merge(s) with {how} in {self.spent:.1f} s "
            f"({self.reused} answer(s) reused for identical geometry); a merge is kept when it "
            f"measures at most {self.margin:.0%} slower than its layers"
        ]
        if self.default_batch:
            out.append(
                f"latency: {self.default_batch} candidate(s) timed at batch {DEFAULT_BATCH}: the batch "
                "size is unknown (a symbolic dim, or no example inputs)"
            )
        if self.default_spatial:
            spatial = ", ".join(f"{s} in {n}D" for n, s in DEFAULT_SPATIAL.items())
            out.append(
                f"latency: {self.default_spatial} candidate(s) timed on a default spatial size per dim "
                f"({spatial}): the input size is unknown (symbolic dims, or no example inputs)"
            )
        if self.over_budget:
            out.append(
                f"latency: budget of {self.budget:g} s spent; {self.over_budget} later candidate(s) "
                "judged by the flops rule instead (raise the budget to time them)"
            )
        if self.failures:
            out.append(
                f"latency: {len(self.failures)} candidate(s) could not be timed and were judged by the "
                f"flops rule (first: {self.failures[0]})"
            )
        return out
