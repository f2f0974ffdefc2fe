"""Prove that a fused model computes what its reference computes, on CPU and (when present) CUDA.

Both models run on the same inputs (generated from the declared input types and shapes,
deterministic from a seed, or given by the caller) with the same runtime settings, and every
output is judged by :func:`convfuse.compare.compare`:

    passed  <=>  max |candidate - reference| <= rtol * max |reference| + atol

``rtol`` defaults per dtype (:data:`convfuse.compare.DEFAULT_RTOL`), ``atol`` to 0; integer and
bool outputs match exactly. A failing image-shaped output is located as ``border`` (the
signature of a padding mistake), ``interior`` or ``everywhere``. For ONNX, :func:`attribute`
compares every tensor both graphs share by name and runs each diverging region alone on the
reference's values at its boundary, naming the regions (merges) that are wrong on their own.

:class:`VerifyResult` is the typed answer; the ``convfuse verify`` command only prints it.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from . import runtime as rt
from ._torch import LazyTorch, torch_loaded
from .compare import Comparison, compare, tolerance_for
from .errors import ConvfuseError, DeviceUnavailableError, InvalidModelError, NotRunnableError
from .input_plan import InputPlan
from .runtime import InputSpec, dims_text, one_line

__all__ = [
    "InputSpec",
    "OutputCheck",
    "Suspect",
    "VerifyResult",
    "attribute",
    "verify",
    "verify_modules",
    "verify_onnx",
]

_NO_CUDA_ORT = "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a GPU machine)"
_NO_CUDA_TORCH = "torch.cuda.is_available() is False"

torch = LazyTorch("verifying torch modules")  # imported on the first torch API call, never for ONNX


# =========================================================================== results
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

    def summary(self) -> str:
        """One line, e.g. for a merge report: verdict, worst relative error, devices, samples."""
        verdict = "matches" if self.passed else f"DIFFERS ({len(self.failed)} of {len(self.checks)} checks)"
        at = f" at {self.inputs_text()}" if self.inputs else ""
        return (
            f"verified: candidate {verdict}; max rel err {_sci(self.max_rel_error)} on "
            f"{', '.join(self.devices)} over {self.samples} sample{'s' if self.samples != 1 else ''}{at}"
        )

    def inputs_text(self, dtypes: bool = False) -> str:
        """The input shapes run, each input once: ``x 2x3x4x4 and 2x3x13x13`` (with dtypes: ``x float32 ...``)."""
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


def _check(
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


# =========================================================================== ONNX
OnnxSource = onnx.ModelProto | str | os.PathLike
Feeds = Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]


def verify_onnx(
    reference: OnnxSource,
    candidate: OnnxSource,
    *,
    device: str = "cpu",
    samples: int = 2,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    inputs: Feeds | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    attribution: bool = True,
) -> VerifyResult:
    """Run two ONNX models (ModelProto or path) on the same inputs with ONNX Runtime; compare outputs.

    Inputs: ``inputs`` (one mapping of arrays, or a sequence of them, one per sample) or else
    ``samples`` random sets from ``seed`` at each checked size, shaped by the declared dims,
    ``shapes`` for symbolic ones, else :class:`~convfuse.input_plan.InputPlan`'s: batch 2, spatial
    dims at two sizes derived from the graph (the smallest every layer accepts and a larger one of
    the other parity; one check per output per size), confirmed by running the reference there and
    searched upward where it does not run (noted). A reference that cannot run at all (or at any
    size tried) raises :class:`~convfuse.errors.NotRunnableError`. On a mismatch with ``attribution`` on, :func:`attribute` names the
    regions that are wrong on their own (not for files over 2 GiB, which ONNX Runtime runs from the
    file, one model at a time). Raises :class:`~convfuse.errors.ConvfuseError` for unusable input
    and :class:`~convfuse.errors.DeviceUnavailableError` for ``device="cuda"`` without CUDA.
    """
    if samples < 1:
        raise ConvfuseError(f"samples must be >= 1, got {samples}")
    ref_model, ref_path = rt.load_for_run(reference, "reference")
    cand_model, cand_path = rt.load_for_run(candidate, "candidate")
    ref_in, ref_out = rt.signature(ref_model)
    cand_in, cand_out = rt.signature(cand_model)
    rt.check_same_names("input", ref_in, cand_in)
    rt.check_same_names("output", ref_out, cand_out)
    for port in ref_out:
        if port.elem_type not in rt.ONNX_DTYPES:
            raise InvalidModelError(
                f"output '{port.name}' has type {port.dtype}, which the verifier cannot compare"
            )
    devices, notes = rt.resolve_devices(device, rt.cuda_in_ort, _NO_CUDA_ORT)
    plan: InputPlan | None = None
    if inputs is not None:
        if shapes:
            raise ConvfuseError("give either inputs or shapes, not both: the inputs fix the shapes")
        groups: list[list[dict[str, np.ndarray]]] | None = [rt.given_feeds(inputs, ref_in, cand_in)]
        notes.append(f"inputs given by the caller: {len(groups[0])} sample(s), none generated")
    else:
        plan = InputPlan(ref_model, ref_in, cand_in, shapes)
        groups = None  # settled on the first device, where the reference first runs
    ports = {p.name: p for p in ref_in}
    cand_dtypes = {p.name: p.dtype for p in cand_out}
    names = [p.name for p in ref_out]

    checks: list[OutputCheck] = []
    suspects: tuple[Suspect, ...] = ()
    for path in (ref_path, cand_path):
        if path is not None:
            notes.append(f"{path}: over 2 GiB, run by ONNX Runtime from the file")
    for dev in devices:
        # One model at a time: a session holds every weight, and models can be gigabytes.
        try:
            sess = rt.session(ref_model, dev, "reference", ref_path)
        except DeviceUnavailableError:
            raise
        except InvalidModelError as e:
            raise NotRunnableError(e.message, path=e.path) from None
        _note_evaluator(sess, "reference", notes)
        if groups is None:
            assert plan is not None
            groups, ref_runs = _settle_sizes(plan, sess, ports, names, samples, seed, notes)
        else:
            ref_runs = [_run_reference(sess, group, ports, names) for group in groups]
        del sess
        sess = rt.session(cand_model, dev, "candidate", cand_path)
        _note_evaluator(sess, "candidate", notes)
        cand_runs = [[rt.run(sess, f, ports, names, "candidate") for f in group] for group in groups]
        del sess
        found = [
            _check(
                p.name,
                dev,
                p.dtype,
                cand_dtypes[p.name],
                [r[p.name] for r in ref_group],
                [c[p.name] for c in cand_group],
                rtol,
                atol,
            )
            for ref_group, cand_group in zip(ref_runs, cand_runs)
            for p in ref_out
        ]
        checks += found
        if attribution and not suspects and not all(c.passed for c in found):
            if ref_path is not None or cand_path is not None:
                notes.append("attribution skipped: a model is over 2 GiB")
                continue
            try:
                suspects = attribute(
                    ref_model,
                    cand_model,
                    feeds=[f for group in groups for f in group],
                    device=dev,
                    rtol=rtol,
                    atol=atol,
                    notes=notes,
                )
            except ConvfuseError as e:  # the mismatch stands even when attribution cannot run
                notes.append(f"attribution failed: {e}")
    return VerifyResult(
        kind="onnx",
        reference=rt.model_label(reference),
        candidate=rt.model_label(candidate),
        checks=tuple(checks),
        devices=tuple(devices),
        samples=len(groups[0]) if groups else 0,
        seed=seed,
        inputs=tuple(
            InputSpec(p.name, p.dtype, tuple(group[0][p.name].shape))
            for group in groups or ()
            for p in ref_in
        ),
        notes=tuple(notes),
        suspects=suspects,
    )


def _note_evaluator(sess: Any, what: str, notes: list[str]) -> None:
    if isinstance(sess, rt.ReferenceSession):
        note = f"{what}: onnxruntime has no CPU kernel for an op (float64 Conv?); ran the ONNX reference evaluator"
        if note not in notes:
            notes.append(note)


def _run_reference(
    sess: Any, feeds: Sequence[Mapping[str, np.ndarray]], ports: Mapping[str, rt.Port], names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """The reference's outputs on ``feeds``; a failure means it cannot be run here (NotRunnableError)."""
    try:
        return [rt.run(sess, f, ports, names, "reference") for f in feeds]
    except InvalidModelError as e:
        raise NotRunnableError(e.message, path=e.path) from None


def _settle_sizes(
    plan: InputPlan,
    sess: Any,
    ports: Mapping[str, rt.Port],
    names: Sequence[str],
    samples: int,
    seed: int,
    notes: list[str],
) -> tuple[list[list[dict[str, np.ndarray]]], list[list[dict[str, np.ndarray]]]]:
    """Input sets per checked size, and the reference's outputs on them: each size is the plan's
    first attempt the reference runs at with no output empty. Where the first size finds none, the reference cannot be
    run (NotRunnableError, one line: the sizes tried and why); where only the second finds none,
    the check runs at one size, noted."""
    used: list[list[InputSpec]] = []
    groups, outputs = [], []
    for index in range(plan.sizes):
        tried: list[tuple[list[InputSpec], str]] = []
        chosen = empty_run = None
        for specs in plan.attempts(index, used[0] if used else None):
            feeds = rt.generate_inputs(specs, samples, seed)
            try:
                run = _run_reference(sess, feeds, ports, names)
            except NotRunnableError as e:
                if not plan.derived:
                    raise
                tried.append((specs, e.message))
                continue
            empty = [n for n in names if run[0][n].size == 0]
            if empty and plan.derived:  # ONNX Runtime pools too small an input into nothing
                tried.append((specs, f"output '{empty[0]}' of the reference is empty"))
                empty_run = empty_run or (specs, feeds, run)
                continue
            chosen = (specs, feeds, run)
            break
        if chosen is None and empty_run is not None:
            chosen = empty_run
            notes.append(
                f"every size tried leaves an output of the reference empty: {tried[0][1]}, compared as such"
            )
        if chosen is not None:
            if tried and chosen is not empty_run:
                notes.append(
                    f"the reference does not run at {len(tried)} size(s) the graph allows, from "
                    f"{_shapes_text(tried[0][0])} ({tried[0][1]}): ran at {_shapes_text(chosen[0])}"
                )
            used.append(chosen[0])
            groups.append(chosen[1])
            outputs.append(chosen[2])
            continue
        if not tried:
            continue  # no larger size is accepted: one check (the plan's notes say so)
        sizes = _shapes_text(tried[0][0]) + (f" to {_shapes_text(tried[-1][0])}" if len(tried) > 1 else "")
        cause = tried[0][1]
        if index == 0:
            raise NotRunnableError(
                f"{cause} (at every input size tried: {len(tried)} from {sizes}, derived from the graph; "
                "give sizes with --shape)"
            )
        notes.append(
            f"checked at one size only: the reference fails at every larger size tried ({sizes}): {cause}"
        )
    notes.extend(plan.describe(used))
    return groups, outputs


def _shapes_text(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name} {dims_text(s.shape)}" for s in specs)


def attribute(
    reference: OnnxSource,
    candidate: OnnxSource,
    *,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    device: str = "cpu",
    samples: int = 1,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    aliases: Mapping[str, str] | None = None,
    notes: list[str] | None = None,
) -> tuple[Suspect, ...]:
    """Name the regions where ``candidate`` first diverges from ``reference`` (empty if nowhere).

    Every tensor a candidate node produces that the reference also has (same name, or mapped by
    ``aliases``: candidate name -> reference name) becomes an extra output of both models and is
    compared. A diverging shared tensor is a *first* divergence when the candidate nodes that
    compute it from the nearest shared tensors read no diverging shared tensor; those nodes
    (typically one merged Conv) and the reference nodes between the same boundaries form the
    :class:`Suspect`. Front ends need only keep the names of the tensors at region boundaries.
    Samples run one at a time (``feeds``, or ``samples`` generated ones) until one diverges.
    """
    ref_model, ref_path = rt.load_for_run(reference, "reference")
    cand_model, cand_path = rt.load_for_run(candidate, "candidate")
    notes = [] if notes is None else notes
    ref_in, _ = rt.signature(ref_model)
    cand_in, _ = rt.signature(cand_model)
    rt.check_same_names("input", ref_in, cand_in)
    if feeds is None:
        feeds = rt.generate_inputs(InputPlan(ref_model, ref_in, cand_in, shapes).first(), samples, seed)
    ref_graph, cand_graph = ref_model.graph, cand_model.graph
    ref_producers, cand_producers = _producers(ref_graph), _producers(cand_graph)

    # Shared tensors, in candidate topological order: candidate name -> reference name.
    aliases = dict(aliases or {})
    shared = {
        out: aliases.get(out, out)
        for node in cand_graph.node
        for out in node.output
        if out and aliases.get(out, out) in ref_producers
    }
    ref_types, cand_types = _tensor_types(ref_model), _tensor_types(cand_model)
    untyped = [
        c
        for c, r in shared.items()
        if cand_types.get(c) not in rt.ONNX_DTYPES or ref_types.get(r) not in rt.ONNX_DTYPES
    ]
    if untyped:
        notes.append(f"attribution skipped {len(untyped)} shared tensor(s) without a numeric type to compare")
    shared = {c: r for c, r in shared.items() if c not in untyped}

    ref_probe = _with_outputs(ref_model, {r: ref_types[r] for r in shared.values()})
    cand_probe = _with_outputs(cand_model, {c: cand_types[c] for c in shared})
    ref_sess = rt.session(ref_probe, device, "reference")
    cand_sess = rt.session(cand_probe, device, "candidate")
    ports = {p.name: p for p in ref_in}
    checks: dict[str, OutputCheck] = {}
    for sample, feed in enumerate(feeds):  # noqa: B007 (the last sample is reported)
        ref_run = rt.run(ref_sess, feed, ports, list(dict.fromkeys(shared.values())), "reference")
        cand_run = rt.run(cand_sess, feed, ports, list(shared), "candidate")
        checks = {
            c: _check(
                c,
                device,
                _dtype(ref_types[r]),
                _dtype(cand_types[c]),
                [ref_run[r]],
                [cand_run[c]],
                rtol,
                atol,
            )
            for c, r in shared.items()
        }
        if not all(check.passed for check in checks.values()):
            break

    # Each diverging region runs alone on the reference's values at its boundary: an error it
    # makes there is its own; one it loses there was inherited from upstream.
    ref_boundary = set(shared.values())
    ref_values = {c: ref_run[r] for c, r in shared.items()}
    suspects = []
    for name, check in checks.items():
        if check.passed:
            continue
        cand_nodes, reached = _region(cand_graph, cand_producers, name, lambda t: t in checks)
        try:
            alone = _region_alone(
                cand_model,
                cand_nodes,
                name,
                cand_types,
                {**feed, **ref_values},
                ref_run[shared[name]],
                device,
                rtol,
                atol,
            )
        except ConvfuseError as e:  # e.g. a node with a subgraph reading outer tensors
            notes.append(f"could not run the region of '{name}' alone ({e}); judged it from the full run")
            alone = None if any(not checks[t].passed for t in reached) else check
        if alone is None or alone.passed:
            continue
        ref_nodes, _ = _region(ref_graph, ref_producers, shared[name], lambda t: t in ref_boundary)
        suspects.append(
            Suspect(
                check=alone,
                candidate_nodes=tuple(_node_label(cand_graph.node[i], i) for i in cand_nodes),
                reference_nodes=tuple(_node_label(ref_graph.node[i], i) for i in ref_nodes),
                sample=sample,
            )
        )
    if checks and not suspects and not all(c.passed for c in checks.values()):
        notes.append(
            "no region is wrong on its own: the error builds up across regions that are each within tolerance"
        )
    return tuple(suspects)


def _region_alone(
    model: onnx.ModelProto,
    nodes: Sequence[int],
    output: str,
    types: Mapping[str, int],
    values: Mapping[str, np.ndarray],
    expected: np.ndarray,
    device: str,
    rtol: float | None,
    atol: float | None,
) -> OutputCheck:
    """Run ``nodes`` of ``model`` alone, fed ``values`` at their inputs, and judge ``output``."""
    graph = model.graph
    produced = {o for i in nodes for o in graph.node[i].output}
    initializers = {t.name: t for t in graph.initializer}
    needed = list(dict.fromkeys(x for i in nodes for x in graph.node[i].input if x and x not in produced))
    inputs = [x for x in needed if x not in initializers]
    missing = [x for x in inputs if x not in values or types.get(x) not in rt.ONNX_DTYPES]
    if missing:
        raise ConvfuseError(f"no value for {', '.join(missing)}")
    sub = onnx.helper.make_graph(
        [graph.node[i] for i in nodes],
        f"{graph.name}-region",
        [onnx.helper.make_tensor_value_info(x, types[x], None) for x in inputs],
        [onnx.helper.make_tensor_value_info(output, types[output], None)],
        [initializers[x] for x in needed if x in initializers],
    )
    region = onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    region.functions.extend(model.functions)
    ports = {x: rt.Port(x, types[x], None) for x in inputs}
    feed = {x: _as_fed(values[x], types[x]) for x in inputs}
    (got,) = rt.run(rt.session(region, device, "region"), feed, ports, [output], "region").values()
    dtype = _dtype(types[output])
    return _check(output, device, dtype, dtype, [expected], [got], rtol, atol)


def _as_fed(value: np.ndarray, elem_type: int) -> np.ndarray:
    """A value in the form an input of ``elem_type`` is fed: bfloat16 run outputs back to bits."""
    if elem_type == onnx.TensorProto.BFLOAT16 and value.dtype.kind == "f":
        return rt.bfloat16_bits(value)  # exact: the values came from bfloat16
    return value


def _dtype(elem_type: int) -> str:
    return rt.Port("", elem_type, None).dtype


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> index of the node that produces it."""
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} #{index}"


def _region(
    graph: onnx.GraphProto, producers: Mapping[str, int], tensor: str, boundary: Callable[[str], bool]
) -> tuple[list[int], set[str]]:
    """Nodes computing ``tensor`` back to ``boundary`` tensors or graph inputs, and the boundaries met."""
    nodes: set[int] = set()
    reached: set[str] = set()
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != tensor and boundary(name):
            reached.add(name)
            continue
        index = producers.get(name)
        if index is not None and index not in nodes:
            nodes.add(index)
            stack.extend(i for i in graph.node[index].input if i)
    return sorted(nodes), reached


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor that ONNX shape inference can type."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # a convenience here: tensors it cannot type are left out and noted
        graph = model.graph
    return {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.input, *graph.output, *graph.value_info]
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
    }


def _with_outputs(model: onnx.ModelProto, extra: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``extra`` (name -> element type)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, elem_type, None)
        for name, elem_type in extra.items()
        if name not in present
    )
    return out


# =========================================================================== torch modules
def _mode_dependent() -> tuple[type, ...]:
    """Layers that compute differently in training mode (batch statistics, random dropout)."""
    return (torch.nn.modules.batchnorm._NormBase, torch.nn.modules.dropout._DropoutNd)


def verify_modules(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    input_shapes: Sequence[int] | Sequence[Sequence[int]] | None = None,
    device: str = "cpu",
    samples: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerifyResult:
    """Run eval-mode copies of two modules on the same inputs with torch and compare every output.

    ``example_inputs`` (a tensor, or a tuple of positional tensors) is one sample; otherwise
    ``input_shapes`` (one shape, or one per positional input) gives ``samples`` standard normal
    sets from ``seed`` in the reference's parameter dtype. Outputs may be a tensor or nested
    tuples, lists and dicts of tensors; both modules must return the same structure.
    """
    if samples < 1:
        raise ConvfuseError(f"samples must be >= 1, got {samples}")
    devices, notes = rt.resolve_devices(device, torch.cuda.is_available, _NO_CUDA_TORCH)
    if example_inputs is not None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not all(isinstance(a, torch.Tensor) for a in args):
            raise ConvfuseError("example_inputs must be a tensor or a tuple of tensors")
        input_sets = [args]
    elif input_shapes is not None:
        dtype = _module_dtype(reference)
        specs = [InputSpec(f"input{i}", "float64", s) for i, s in enumerate(_shape_list(input_shapes))]
        input_sets = [
            tuple(torch.from_numpy(feed[s.name]).to(dtype) for s in specs)
            for feed in rt.generate_inputs(specs, samples, seed)
        ]
    else:
        raise ConvfuseError("verifying modules needs example_inputs or input_shapes")

    checks: list[OutputCheck] = []
    for dev in devices:
        first = dev == devices[0]
        ref = _eval_copy(reference, dev, "reference", notes if first else [])
        cand = _eval_copy(candidate, dev, "candidate", notes if first else [])
        ref_runs = [_run_module(ref, args, dev, "reference") for args in input_sets]
        cand_runs = [_run_module(cand, args, dev, "candidate") for args in input_sets]
        if list(ref_runs[0]) != list(cand_runs[0]):
            raise ConvfuseError(
                f"reference and candidate return different outputs: {', '.join(ref_runs[0]) or '-'} "
                f"vs {', '.join(cand_runs[0]) or '-'}"
            )
        checks += [
            _check(
                name,
                dev,
                _torch_dtype(ref_runs[0][name]),
                _torch_dtype(cand_runs[0][name]),
                [_to_numpy(r[name]) for r in ref_runs],
                [_to_numpy(c[name]) for c in cand_runs],
                rtol,
                atol,
            )
            for name in ref_runs[0]
        ]
    return VerifyResult(
        kind="torch",
        reference=type(reference).__name__,
        candidate=type(candidate).__name__,
        checks=tuple(checks),
        devices=tuple(devices),
        samples=len(input_sets),
        seed=seed,
        inputs=tuple(
            InputSpec(f"input{i}", _torch_dtype(a), tuple(a.shape)) for i, a in enumerate(input_sets[0])
        ),
        notes=tuple(notes),
    )


def _shape_list(input_shapes: Sequence[int] | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """One shape, or one per input, as a list of tuples."""
    items = list(input_shapes)
    if items and all(isinstance(d, int) for d in items):
        return [tuple(int(d) for d in items)]  # type: ignore[arg-type]
    return [tuple(int(d) for d in s) for s in items]  # type: ignore[union-attr]


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    """Dtype of the module's first floating parameter or buffer (float32 when it has none)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _torch_dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")  # torch.float32 -> "float32", as numpy names it


def _eval_copy(module: torch.nn.Module, device: str, what: str, notes: list[str]) -> torch.nn.Module:
    """A deep copy in eval mode on ``device``: the caller's module is never changed."""
    if any(m.training and isinstance(m, _mode_dependent()) for m in module.modules()):
        notes.append(f"{what} was in training mode: compared a copy in eval mode")
    try:
        return copy.deepcopy(module).eval().to(device)
    except Exception as e:
        raise ConvfuseError(f"cannot copy the {what} module to {device}: {one_line(e)}") from None


def _run_module(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], device: str, what: str
) -> dict[str, torch.Tensor]:
    try:
        with torch.inference_mode():
            result = module(*(a.to(device) for a in args))
    except Exception as e:  # the module cannot run on these inputs: bad input, not a mismatch
        shapes = ", ".join(dims_text(tuple(a.shape)) for a in args)
        raise ConvfuseError(f"the {what} module failed on inputs of shape {shapes}: {one_line(e)}") from None
    return _flatten(result)


def _flatten(value: Any, prefix: str = "output") -> dict[str, torch.Tensor]:
    """Tensors of a module's output by path: ``output``, ``output[0]``, ``output['key']``..."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if value is None:
        return {}
    items: Any
    if isinstance(value, Mapping):
        items = ((f"{prefix}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (tuple, list)):
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(value))
    else:
        raise ConvfuseError(f"module output {prefix} is a {type(value).__name__}; only tensors are compared")
    out: dict[str, torch.Tensor] = {}
    for path, item in items:
        out.update(_flatten(item, path))
    return out


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 (which numpy lacks) as exact float32."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


# =========================================================================== dispatch
def verify(reference: Any, candidate: Any, **options: Any) -> VerifyResult:
    """Compare ``candidate`` with ``reference``: two ONNX models (ModelProto or path) or two modules.

    ONNX models go to :func:`verify_onnx`, ``nn.Module`` pairs to :func:`verify_modules` (which
    need ``example_inputs`` or ``input_shapes``); see those for the options.
    """
    loaded = torch_loaded()  # a module exists only if torch was imported: never import it here
    if (
        loaded is not None
        and isinstance(reference, loaded.nn.Module)
        and isinstance(candidate, loaded.nn.Module)
    ):
        return verify_modules(reference, candidate, **options)
    onnx_like = (onnx.ModelProto, str, os.PathLike)
    if isinstance(reference, onnx_like) and isinstance(candidate, onnx_like):
        return verify_onnx(reference, candidate, **options)
    raise ConvfuseError(
        "verify needs two ONNX models (paths or ModelProto) or two nn.Modules, got "
        f"{type(reference).__name__} and {type(candidate).__name__}"
    )
