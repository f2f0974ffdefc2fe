"""Side-by-side latency: variants timed round-robin in one process, median of repetitions.

Each repetition runs every variant once (rotating which goes first, so no variant always follows
the same neighbour); a variant's sample is the mean of ``inner`` back-to-back calls, with ``inner``
chosen per variant so that one sample lasts about ``sample_s``. The garbage collector is off while
timing.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Timing", "background_load", "interleaved"]


@dataclass(frozen=True)
class Timing:
    """Per-call seconds: median and quartiles over the repetitions."""

    median: float
    q1: float
    q3: float
    reps: int
    inner: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (a noise indicator)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], statistics.median(samples), q[2]


def _calibrate(fn: Callable[[], object], sample_s: float, warmup: int) -> int:
    """Warm ``fn`` up and return how many calls make one sample of about ``sample_s`` seconds."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(1000, round(sample_s / once)))


def interleaved(
    variants: Mapping[str, Callable[[], object]], reps: int, sample_s: float = 0.02, warmup: int = 2
) -> dict[str, Timing]:
    """Time every callable in ``variants`` round-robin for ``reps`` repetitions."""
    names = list(variants)
    inner = {n: _calibrate(variants[n], sample_s, warmup) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                fn, k = variants[n], inner[n]
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                samples[n].append((time.perf_counter() - t0) / k)
    finally:
        if enabled:
            gc.enable()
    out = {}
    for n in names:
        q1, med, q3 = _quartiles(samples[n])
        out[n] = Timing(med, q1, q3, reps, inner[n])
    return out


def _busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (``/proc/stat``), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user/nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


@contextmanager
def background_load() -> Iterator[list[float]]:
    """Average number of cores other processes kept busy inside the ``with`` block.

    Yields a list that holds one value when the block ends (empty when ``/proc/stat`` is
    unavailable): machine-wide busy CPU time minus this process's, over the wall time.
    """
    out: list[float] = []
    busy0, own0, t0 = _busy_seconds(), os.times(), time.perf_counter()
    try:
        yield out
    finally:
        busy1, own1, wall = _busy_seconds(), os.times(), time.perf_counter() - t0
        if busy0 is not None and busy1 is not None and wall > 0:
            own = (own1.user - own0.user) + (own1.system - own0.system)
            out.append(max(0.0, (busy1 - busy0 - own) / wall))
