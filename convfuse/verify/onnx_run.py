"""The ONNX verifier: two models run on the same inputs with ONNX Runtime, every output judged.

Inputs are the caller's, or generated at the sizes :class:`~convfuse.verify.input_plan.InputPlan`
derives, settled by running the reference there (:func:`_settle_sizes`). On a mismatch,
:func:`convfuse.verify.attribution.attribute` names the regions that are wrong on their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .. import runtime as rt
from ..errors import ConvfuseError, DeviceUnavailableError, InvalidModelError, NotRunnableError
from .attribution import attribute
from .input_plan import InputPlan
from .inputs import (
    ONNX_DTYPES,
    Feeds,
    InputSpec,
    OnnxSource,
    Port,
    check_same_names,
    dims_text,
    generate_inputs,
    given_feeds,
    load_for_run,
    model_label,
    resolve_devices,
    signature,
)
from .result import OutputCheck, Suspect, VerifyResult, judge

__all__ = ["verify_onnx"]

_NO_CUDA_ORT = "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a GPU machine)"


def bfloat16_inputs(ports: Sequence[Port]) -> frozenset[str]:
    """Names of the inputs declared bfloat16 (fed as uint16 bits)."""
    return frozenset(p.name for p in ports if p.dtype == "bfloat16")


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
    size tried) raises :class:`~convfuse.errors.NotRunnableError`. On a mismatch with
    ``attribution`` on, :func:`attribute` names the regions that are wrong on their own (not for
    files over 2 GiB, which ONNX Runtime runs from the file, one model at a time).
    Raises :class:`~convfuse.errors.ConvfuseError` for unusable input and
    :class:`~convfuse.errors.DeviceUnavailableError` for ``device="cuda"`` without CUDA.
    """
    if samples < 1:
        raise ConvfuseError(f"samples must be >= 1, got {samples}")
    ref_model, ref_path = load_for_run(reference, "reference")
    cand_model, cand_path = load_for_run(candidate, "candidate")
    ref_in, ref_out = signature(ref_model)
    cand_in, cand_out = signature(cand_model)
    check_same_names("input", ref_in, cand_in)
    check_same_names("output", ref_out, cand_out)
    for port in ref_out:
        if port.elem_type not in ONNX_DTYPES:
            raise InvalidModelError(
                f"output '{port.name}' has type {port.dtype}, which the verifier cannot compare"
            )
    devices, notes = resolve_devices(device, rt.cuda_in_ort, _NO_CUDA_ORT)
    plan: InputPlan | None = None
    if inputs is not None:
        if shapes:
            raise ConvfuseError("give either inputs or shapes, not both: the inputs fix the shapes")
        given = given_feeds(inputs, ref_in, cand_in)
        groups: list[list[dict[str, np.ndarray]]] | None = [given]
        notes.append(f"inputs given by the caller: {len(given)} sample(s), none generated")
    else:
        plan = InputPlan(ref_model, ref_in, cand_in, shapes)
        groups = None  # settled on the first device, where the reference first runs
    bf16 = bfloat16_inputs(ref_in)
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
        if groups is None and plan is not None:
            groups, ref_runs = _settle_sizes(plan, sess, bf16, names, samples, seed, notes)
        else:
            ref_runs = [_run_reference(sess, group, bf16, names) for group in groups or ()]
        del sess
        sess = rt.session(cand_model, dev, "candidate", cand_path)
        _note_evaluator(sess, "candidate", notes)
        cand_runs = [
            [rt.run(sess, f, names, "candidate", bfloat16=bf16) for f in group] for group in groups or ()
        ]
        del sess
        found = [
            judge(
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
                    feeds=[f for group in groups or () for f in group],
                    device=dev,
                    rtol=rtol,
                    atol=atol,
                    notes=notes,
                )
            except ConvfuseError as e:  # the mismatch stands even when attribution cannot run
                notes.append(f"attribution failed: {e}")
    return VerifyResult(
        kind="onnx",
        reference=model_label(reference),
        candidate=model_label(candidate),
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


def _note_evaluator(sess: rt.Session, what: str, notes: list[str]) -> None:
    if isinstance(sess, rt.ReferenceSession):
        note = (
            f"{what}: onnxruntime has no CPU kernel for an op (float64 Conv?); "
            "ran the ONNX reference evaluator"
        )
        if note not in notes:
            notes.append(note)


def _run_reference(
    sess: rt.Session, feeds: Sequence[Mapping[str, np.ndarray]], bf16: frozenset[str], names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """The reference's outputs on ``feeds``; a failure means it cannot be run here (NotRunnableError)."""
    try:
        return [rt.run(sess, f, names, "reference", bfloat16=bf16) for f in feeds]
    except InvalidModelError as e:
        raise NotRunnableError(e.message, path=e.path) from None


def _settle_sizes(
    plan: InputPlan,
    sess: rt.Session,
    bf16: frozenset[str],
    names: Sequence[str],
    samples: int,
    seed: int,
    notes: list[str],
) -> tuple[list[list[dict[str, np.ndarray]]], list[list[dict[str, np.ndarray]]]]:
    """Input sets per checked size, and the reference's outputs on them: each size is the plan's
    first attempt the reference runs at with no output empty. Where the first size finds none,
    the reference cannot be run (NotRunnableError, one line: the sizes tried and why); where only
    the second finds none, the check runs at one size, noted."""
    used: list[list[InputSpec]] = []
    groups, outputs = [], []
    for index in range(plan.sizes):
        tried: list[tuple[list[InputSpec], str]] = []
        chosen = empty_run = None
        for specs in plan.attempts(index, used[0] if used else None):
            feeds = generate_inputs(specs, samples, seed)
            try:
                run = _run_reference(sess, feeds, bf16, names)
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
