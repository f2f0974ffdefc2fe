"""``convfuse merge MODEL.onnx [-o OUT.onnx | --in-place]``: fuse, check, write atomically, report.

Exit codes: 0 done, 1 verification failed (nothing written), 2 bad input or usage, 3 internal error,
4 not verified because the input cannot be run here (nothing written without --allow-unverified).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path

import click
import onnx

from convfuse.errors import ConvfuseError, NotRunnableError
from convfuse.frontends.onnx.io import check_file, external_data_name, stage_model
from convfuse.report import Report
from convfuse.report_html import html_page, write_page
from convfuse.runtime import parse_shape
from convfuse.verify import VerifyResult, verify_onnx

from . import _run
from .options import (
    EXIT_UNVERIFIED,
    EXIT_VERIFY_FAILED,
    allow_unverified_option,
    html_option,
    in_place_option,
    json_option,
    model_argument,
    output_option,
    policy_option,
    shape_option,
    verbose_option,
    verify_option,
)

__all__ = ["merge", "default_output"]


def default_output(model: Path) -> Path:
    """``dir/name.onnx`` -> ``dir/name.fused.onnx``."""
    return (
        model.with_name(model.stem + ".fused.onnx")
        if model.suffix == ".onnx"
        else model.with_name(model.name + ".fused.onnx")
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.exists() and a.samefile(b))
    except OSError:
        return False


def _target(model: Path, output: Path | None, in_place: bool, verify: bool, allow_unverified: bool) -> Path:
    """Where to write, or exit 2 with one line: never over the input unless ``--in-place``."""
    if in_place:
        if output is not None and not _same_file(model, output):
            raise click.UsageError("give either -o/--output or --in-place, not both")
        if not verify:
            raise click.UsageError("--in-place replaces the input only after verification; drop --no-verify")
        if allow_unverified:
            raise click.UsageError(
                "--in-place replaces the input only after verification; drop --allow-unverified"
            )
        return model
    target = output if output is not None else default_output(model)
    if _same_file(model, target):
        _run.fail(target, "is the input file; choose another output, or replace the input with --in-place")
    if target.is_dir():
        _run.fail(target, "is a directory; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        _run.fail(target, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        _run.fail(target, f"directory {parent} is not writable")
    return target


@click.command("merge", short_help="Fuse a model and write the result.")
@model_argument
@output_option
@policy_option
@json_option
@verbose_option
@verify_option
@shape_option
@allow_unverified_option
@in_place_option
@html_option("When verification fails, write the failed check as one self-contained HTML page here.")
def merge(
    model: Path,
    output: Path | None,
    policy: str,
    device: str,
    latency_budget: float,
    as_json: bool,
    verbose: bool,
    verify: bool,
    shapes: tuple[str, ...],
    allow_unverified: bool,
    in_place: bool,
    html_path: Path | None,
) -> None:
    """Merge linear runs in MODEL.onnx into single convolutions and write the fused model.

    Writes MODEL.fused.onnx beside the input unless -o is given. The input is never modified,
    unless --in-place asks to replace it with the verified result.
    The fused model is checked against the input with ONNX Runtime before it is written, at the
    input's declared shape; symbolic dims take batch 2 and two spatial sizes derived from the
    graph (the smallest every layer accepts, and a larger one of the other parity), or --shape.

    Exit codes: 0 done, 1 verification failed (nothing written), 2 bad input or usage,
    3 internal error (a bug: please report it), 4 not verified: the input cannot be run here
    (custom operators, or no input size it runs at), nothing written unless --allow-unverified.
    """
    try:
        check_file(model)  # the input's own problems first, before the output's
    except ConvfuseError as exc:
        _run.fail(model, exc)
    target = _target(model, output, in_place, verify, allow_unverified)
    try:
        shape_map = dict(parse_shape(s) for s in shapes)
    except ConvfuseError as exc:
        raise click.UsageError(str(exc)) from None
    loaded, fused, report, progress = _run.fuse(model, policy, device, latency_budget, keep_input=verify)
    say = progress or (lambda message: None)
    if not in_place:
        data = target.parent / external_data_name(target)
        for used in loaded.data_files:
            if _same_file(used, target) or _same_file(used, data):
                _run.fail(target, f"writing it would overwrite {used}, which holds the input's external data")
    # The input in memory is kept only to verify against; a large one was fused in place and is
    # verified from its file, so that one copy of the weights is in memory at a time.
    reference: onnx.ModelProto | Path = loaded.model if fused is not loaded.model else model
    external, data_files = loaded.external_data, loaded.data_files
    del loaded
    extra = {"input": str(model), "output": None}
    say(f"writing {target} (temporary name until verified)")
    try:
        staged = stage_model(fused, target, external_data=True if external else None)
    except ConvfuseError as exc:
        _run.fail(target, exc)
    candidate: onnx.ModelProto | Path = fused if isinstance(reference, onnx.ModelProto) else staged.path
    del fused
    with staged:
        if verify:
            say("verifying")
            started = time.monotonic()
            verdict, detail, result = _verify(reference, candidate, shape_map)
            report.timings["verify"] = time.monotonic() - started
            report.verification = detail
            if verdict is _Verdict.FAILED:
                page = _page(html_path, result, report, extra)
                _run.emit(report, as_json, extra, lines=page, verbose=verbose)
                cause = detail.removeprefix("verified: ")
                _run.fail(model, f"verification failed: {cause}; nothing written", EXIT_VERIFY_FAILED)
            if verdict is _Verdict.NOT_RUN:
                if in_place or not allow_unverified:
                    _run.emit(report, as_json, extra, verbose=verbose)
                    why = (
                        "--in-place replaces the input only after verification"
                        if in_place
                        else "nothing written (--allow-unverified writes it anyway)"
                    )
                    _run.fail(model, f"{detail}; {why}", EXIT_UNVERIFIED)
                click.echo(
                    f"convfuse: warning: {model}: {detail}; written unverified (--allow-unverified): "
                    "check it with `convfuse verify` where the input runs",
                    err=True,
                )
        else:
            report.verification = "verification skipped (--no-verify)"
        try:
            staged.commit()
        except ConvfuseError as exc:
            _run.fail(target, exc)
    if in_place:
        stale = [p for p in data_files if not _same_file(p, target.parent / external_data_name(target))]
        if stale:
            report.notes.append(
                f"{', '.join(str(p) for p in stale)}: no longer used by {target} (left in place)"
            )
    extra["output"] = str(target)
    done = f"{'replaced' if in_place else 'wrote'} {target}"
    _run.emit(report, as_json, extra, lines=(done,), verbose=verbose)


class _Verdict(Enum):
    PASSED = "passed"
    FAILED = "failed"  # the candidate differs, or cannot be run where the input can
    NOT_RUN = "not-run"  # the input itself cannot be run here (custom operators)


def _page(
    path: Path | None, result: VerifyResult | None, report: Report, extra: dict[str, object]
) -> tuple[str, ...]:
    """Write the failed check's HTML page to ``path`` (when given, and the check ran): the line
    saying so, or a warning on stderr when it cannot be written (the failure stands)."""
    if path is None or result is None:
        return ()
    try:
        page = html_page(result, title="convfuse merge: verification", report_text=report.summary())
        write_page(path, page)
    except ConvfuseError as exc:
        click.echo(f"convfuse: warning: {exc}", err=True)
        return ()
    extra["html"] = str(path)
    return (f"error page: {path}",)


def _verify(
    reference: onnx.ModelProto | Path, candidate: onnx.ModelProto | Path, shapes: Mapping[str, Sequence[int]]
) -> tuple[_Verdict, str, VerifyResult | None]:
    """Whether ``candidate`` computes what ``reference`` computes (:func:`convfuse.verify.verify_onnx`
    on CPU, two seeded random samples at each checked size, ``shapes`` for symbolic inputs),
    the verdict on one line and the result (None when the check could not run). Models over
    2 GiB are given as file paths (ONNX Runtime loads them with their external data).

    When the input itself cannot run (operators ONNX Runtime lacks, no input size it runs at)
    the merge is not verified, which is not a failure of the merge. When the check fails
    otherwise, the input is tried alone: if it runs, the candidate is at fault (a failure).
    """
    try:
        result = verify_onnx(reference, candidate, shapes=shapes or None)
    except NotRunnableError as exc:
        return _Verdict.NOT_RUN, f"not verified: the input model cannot be run here ({exc})", None
    except ConvfuseError as exc:
        try:
            verify_onnx(reference, reference, samples=1, attribution=False, shapes=shapes or None)
        except ConvfuseError as alone:
            return _Verdict.NOT_RUN, f"not verified: the input model cannot be run here ({alone})", None
        return (
            _Verdict.FAILED,
            f"verification could not run the fused model ({exc}); use --no-verify to skip",
            None,
        )
    detail = result.summary()
    if not result.passed:
        detail += "; " + "; ".join(s.line() for s in result.suspects)
        return _Verdict.FAILED, detail, result
    return _Verdict.PASSED, detail, result
