"""The verifier's typed answer: one :class:`OutputCheck` per tensor and device, the
:class:`Suspect` regions attribution names, and the :class:`VerifyResult` holding them.

``passed  <=>  max |candidate - reference| <= rtol * max |reference| + atol`` per check
(:func:`convfuse.compare.compare`); :func:`judge` makes a check from the two sides' values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..compare import Comparison, compare, tolerance_for
from .inputs import InputSpec, dims_text

__all__ = ["OutputCheck", "Suspect", "VerifyResult", "judge"]


@dataclass(frozen=True)
class OutputCheck:
    """One output (or shared intermediate tensor) compared on one device."""

    name: str
    device: str
    dtype: str
    shape: tuple[int, ...]
    rtol: float
    atol: float
    exact: bool
    comparison: Comparison | None  # None when the tensors could not be compared at all
    problem: str = ""  # why not: the candidate's shape or dtype differs

    @property
    def passed(self) -> bool:
        return self.comparison is not None and self.comparison.passed

    @property
    def max_abs_error(self) -> float:
        return math.inf if self.comparison is None else self.comparison.max_abs_error

    @property
    def max_rel_error(self) -> float:
        """Max abs error over the output's scale (max |reference|)."""
        return math.inf if self.comparison is None else self.comparison.max_rel_error

    @property
    def tolerance(self) -> float:
        """Absolute tolerance applied: ``rtol * max|reference| + atol`` (0 when exact)."""
        return 0.0 if self.comparison is None else self.comparison.tolerance

    @property
    def error_map(self) -> np.ndarray | None:
        """For a failing image-shaped tensor, max |error| per spatial position (over samples,
        batch and channels); None otherwise. ``border_width`` says which ring to mark."""
        return None if self.comparison is None else self.comparison.error_map

    @property
    def border_width(self) -> int | None:
        """Ring width when the errors lie on the border only (:func:`convfuse.compare.locate`)."""
        return None if self.comparison is None else self.comparison.border_width

    def verdict(self) -> str:
        """``ok``, or ``FAIL`` with how many elements and where."""
        c = self.comparison
        if c is None:
            return f"FAIL: {self.problem}"
        if c.passed:
            return "ok"
        where = self.where()
        return f"FAIL: {c.mismatched:,} of {c.total:,} elements" + (f", {where}" if where else "")

    def where(self) -> str:
        """Where a failing tensor is wrong: non-finite values, a border ring, interior, everywhere."""
        c = self.comparison
        if c is None or c.passed:
            return ""
        parts = ["non-finite values differ"] if c.max_abs_error == math.inf else []
        if c.location == "border":
            inner = c.interior_max_abs_error or 0.0
            rel = inner / c.scale if c.scale > 0 else inner
            parts.append(
                f"on the border only (ring width {c.border_width}, interior max rel err {rel:.1e}): "
                "a padding mistake?"
            )
        elif c.location:
            parts.append(c.location)
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {
            "name": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "passed": self.passed,
            "exact": self.exact,
            "rtol": self.rtol,
            "atol": self.atol,
            "tolerance": _finite(self.tolerance),
            "max_abs_error": _finite(self.max_abs_error),
            "max_rel_error": _finite(self.max_rel_error),
            "scale": None if c is None else _finite(c.scale),
            "mismatched": None if c is None else c.mismatched,
            "total": None if c is None else c.total,
            "location": None if c is None else c.location,
            "border_width": None if c is None else c.border_width,
            "interior_max_abs_error": None if c is None else _finite(c.interior_max_abs_error),
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Suspect:
    """A region of the candidate that is wrong on its own, and the reference nodes it replaced.

    ``candidate_nodes`` compute the shared tensor ``check.name`` from the nearest shared tensors
    before it (typically one merged Conv); ``check`` judges them run alone on the reference's
    values at those tensors, so the error is theirs, not inherited.
    """

    check: OutputCheck
    candidate_nodes: tuple[str, ...]
    reference_nodes: tuple[str, ...]
    sample: int = 0  # the input sample it was judged on (the first one that diverged)

    def line(self) -> str:
        where = self.check.where()
        return (
            f"wrong on its own (sample {self.sample}): tensor '{self.check.name}' from candidate "
            f"{', '.join(self.candidate_nodes) or 'no node'} (reference: "
            f"{', '.join(self.reference_nodes) or 'no node'}): max rel err {_sci(self.check.max_rel_error)}"
            + (f", {where}" if where else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.check.name,
            "candidate_nodes": list(self.candidate_nodes),
            "reference_nodes": list(self.reference_nodes),
            "sample": self.sample,
            "check": self.check.to_dict(),
        }


@dataclass(frozen=True)
class VerifyResult:
    """Every output compared on every device, with what was run to get there."""

    kind: str  # "onnx" or "torch"
    reference: str
    candidate: str
    checks: tuple[OutputCheck, ...]
    devices: tuple[str, ...]
    samples: int
    seed: int
    inputs: tuple[InputSpec, ...] = ()  # every shape run: one spec per input per checked size
    notes: tuple[str, ...] = ()
    suspects: tuple[Suspect, ...] = ()

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 when the candidate matches, 1 when it does not (errors raise; the CLI exits 2)."""
        return 0 if self.passed else 1

    @property
    def failed(self) -> tuple[OutputCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def max_rel_error(self) -> float:
        """The worst relative error over all float outputs and devices (0 when there are none)."""
        return max((c.max_rel_error for c in self.checks if not c.exact), default=0.0)

    def finding(self) -> str:
        """What was found, on one line: verdict, worst relative error, devices, samples, sizes."""
        verdict = "matches" if self.passed else f"DIFFERS ({len(self.failed)} of {len(self.checks)} checks)"
        at = f" at {self.inputs_text()}" if self.inputs else ""
        return (
            f"candidate {verdict}; max rel err {_sci(self.max_rel_error)} on "
            f"{', '.join(self.devices)} over {self.samples} sample{'s' if self.samples != 1 else ''}{at}"
        )

    def summary(self) -> str:
        """One line, e.g. for a merge report: ``verified: `` and :meth:`finding`."""
        return f"verified: {self.finding()}"

    def inputs_text(self, dtypes: bool = False) -> str:
        """The input shapes run, each input once: ``x 2x3x4x4 and 2x3x13x13``
        (with ``dtypes``: ``x float32 2x3x4x4 ...``)."""
        shapes: dict[tuple[str, str], list[str]] = {}
        for spec in self.inputs:
            shapes.setdefault((spec.name, spec.dtype), []).append(dims_text(spec.shape))
        return ", ".join(
            f"{name}{' ' + dtype if dtypes else ''} {' and '.join(dict.fromkeys(dims))}"
            for (name, dtype), dims in shapes.items()
        )

    def to_text(self) -> str:
        plural = "s" if self.samples != 1 else ""
        runs = f"{', '.join(self.devices)}; {self.samples} sample{plural}, seed {self.seed}"
        if self.passed:
            head = f"PASS: candidate {self.candidate} matches reference {self.reference} ({runs})"
        else:
            head = (
                f"FAIL: {len(self.failed)} of {len(self.checks)} output checks differ: candidate "
                f"{self.candidate} vs reference {self.reference} ({runs})"
            )
        rows = [("output", "device", "dtype", "shape", "max abs err", "max rel err", "rel tol", "result")]
        rows += [
            (
                c.name,
                c.device,
                c.dtype,
                dims_text(c.shape),
                _sci(c.max_abs_error),
                _sci(c.max_rel_error),
                "exact" if c.exact else f"{c.rtol:.0e}" + (f" + abs {c.atol:.0e}" if c.atol else ""),
                c.verdict(),
            )
            for c in self.checks
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [head]
        lines += ["  " + "  ".join(f"{v:<{w}}" for v, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        if self.inputs:
            lines.append(f"inputs: {self.inputs_text(dtypes=True)}")
        lines += [s.line() for s in self.suspects]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite floats become null; ``problem`` and ``location`` say why)."""
        return {
            "passed": self.passed,
            "exit_code": self.exit_code,
            "kind": self.kind,
            "reference": self.reference,
            "candidate": self.candidate,
            "devices": list(self.devices),
            "samples": self.samples,
            "seed": self.seed,
            "inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in self.inputs],
            "outputs": [c.to_dict() for c in self.checks],
            "suspects": [s.to_dict() for s in self.suspects],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        return self.to_text()


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _sci(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else "-"


def judge(
    name: str,
    device: str,
    dtype: str,
    cand_dtype: str,
    refs: Sequence[np.ndarray],
    cands: Sequence[np.ndarray],
    rtol: float | None,
    atol: float | None,
) -> OutputCheck:
    """Judge one tensor over all samples together (one scale, one tolerance)."""
    r_tol, a_tol, exact = tolerance_for(dtype, rtol, atol)
    shape = tuple(refs[0].shape)
    wrong_shape = next((c.shape for r, c in zip(refs, cands) if r.shape != c.shape), None)
    problem = ""
    if cand_dtype != dtype:
        problem = f"candidate dtype is {cand_dtype}"
    elif wrong_shape is not None:
        problem = f"candidate shape is {dims_text(tuple(wrong_shape))}"
    if problem:
        return OutputCheck(name, device, dtype, shape, r_tol, a_tol, exact, None, problem)
    if all(r.shape == shape for r in refs):  # stacked: [samples, N, C, *spatial]
        ref, cand, spatial_from = np.stack(refs), np.stack(cands), (3 if len(shape) >= 3 else None)
    else:  # samples of different shapes (given inputs): no common grid to locate errors on
        ref, cand = np.concatenate([r.ravel() for r in refs]), np.concatenate([c.ravel() for c in cands])
        spatial_from = None
    comparison = compare(ref, cand, rtol=r_tol, atol=a_tol, exact=exact, spatial_from=spatial_from)
    return OutputCheck(name, device, dtype, shape, r_tol, a_tol, exact, comparison)
