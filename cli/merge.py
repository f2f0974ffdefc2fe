"""``convfuse merge MODEL.onnx [-o OUT.onnx | --in-place]``: fuse, check, write atomically, report.

Parses the options, calls :func:`convfuse.files.merge_file`, prints its report and exits with
its code: 0 done, 1 verification failed (nothing written), 2 bad input or usage, 3 internal
error, 4 not verified because the input cannot be run here (nothing written without
--allow-unverified).
"""

from __future__ import annotations

from pathlib import Path

import click

from convfuse import files
from convfuse.errors import ConvfuseError
from convfuse.report_html import html_page, write_page

from . import _run
from .options import (
    allow_unverified_option,
    html_option,
    in_place_option,
    json_option,
    model_argument,
    output_option,
    parse_shapes,
    policy_option,
    shape_option,
    verbose_option,
    verify_option,
)

__all__ = ["merge", "default_output"]

default_output = files.default_output


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
        try:
            shape_map = parse_shapes(shapes)
        except click.UsageError:  # the files' own problems are reported first, as merge_file orders them
            files.check_paths(
                model, output, in_place=in_place, verify=verify, allow_unverified=allow_unverified
            )
            raise
        result = files.merge_file(
            model,
            output,
            in_place=in_place,
            policy=policy,
            device=device,
            latency_budget=latency_budget,
            verify=verify,
            shapes=shape_map,
            allow_unverified=allow_unverified,
            progress=_run.progress(),
        )
    except files.OptionConflictError as exc:
        raise click.UsageError(exc.message) from None
    except ConvfuseError as exc:
        _run.fail(model, exc)
    for warning in result.warnings:
        click.echo(f"convfuse: warning: {warning}", err=True)
    extra: dict[str, object] = {"input": str(model), "output": str(result.target) if result.written else None}
    if result.written:
        done = f"{'replaced' if in_place else 'wrote'} {result.target}"
        _run.emit(result.report, as_json, extra, lines=(done,), verbose=verbose)
        return
    page = _page(html_path, result, extra) if result.verification.verdict is files.Verdict.FAILED else ()
    _run.emit(result.report, as_json, extra, lines=page, verbose=verbose)
    _run.fail(model, result.error or "nothing written", result.exit_code)


def _page(path: Path | None, result: files.MergeResult, extra: dict[str, object]) -> tuple[str, ...]:
    """Write the failed check's HTML page to ``path`` (when given, and the check ran): the line
    saying so, or a warning on stderr when it cannot be written (the failure stands)."""
    checked = result.verification.result
    if path is None or checked is None:
        return ()
    try:
        page = html_page(checked, title="convfuse merge: verification", report_text=result.report.summary())
        write_page(path, page)
    except ConvfuseError as exc:
        click.echo(f"convfuse: warning: {exc}", err=True)
        return ()
    extra["html"] = str(path)
    return (f"error page: {path}",)
