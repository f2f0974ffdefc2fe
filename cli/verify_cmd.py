"""``convfuse verify REFERENCE CANDIDATE``: compare two ONNX models; exit 0 match, 1 mismatch, 2 error."""

from __future__ import annotations

import json
from pathlib import Path

import click

from convfuse.errors import ConvfuseError, ExitCode, one_line
from convfuse.report_html import html_page, write_page
from convfuse.verify import verify_onnx
from convfuse.verify.inputs import load_inputs, parse_shape

from .options import (
    atol_option,
    attribution_option,
    html_option,
    inputs_option,
    json_option,
    rtol_option,
    samples_option,
    seed_option,
    shape_option,
    verify_device_option,
)

__all__ = ["verify"]


@click.command("verify")
@click.argument("reference", type=click.Path(readable=False))
@click.argument("candidate", type=click.Path(readable=False))
@verify_device_option
@inputs_option
@shape_option
@samples_option
@seed_option
@rtol_option
@atol_option
@attribution_option
@json_option
@html_option(
    "Also write the result as one self-contained HTML page (verdict, errors, attribution, error maps)."
)
def verify(
    reference: str,
    candidate: str,
    device: str,
    inputs_file: str | None,
    shapes: tuple[str, ...],
    samples: int,
    seed: int,
    rtol: float | None,
    atol: float | None,
    attribution: bool,
    as_json: bool,
    html_path: Path | None,
) -> None:
    """Check that CANDIDATE computes what REFERENCE computes (both ONNX files).

    Exit 0 when every output is within tolerance, 1 when one is not, 2 when the input cannot be
    used or the device asked for is absent.
    """
    try:
        shape_map = dict(parse_shape(s) for s in shapes) or None
        inputs = load_inputs(inputs_file) if inputs_file is not None else None
        result = verify_onnx(
            reference,
            candidate,
            device=device,
            samples=samples,
            seed=seed,
            shapes=shape_map,
            inputs=inputs,
            rtol=rtol,
            atol=atol,
            attribution=attribution,
        )
        if html_path is not None:
            write_page(html_path, html_page(result))
    except ConvfuseError as exc:
        click.echo(f"convfuse: error: {one_line(exc)}", err=True)
        raise click.exceptions.Exit(int(ExitCode.BAD_INPUT)) from None
    click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False) if as_json else result.to_text())
    if html_path is not None and not as_json:
        click.echo(f"wrote {html_path}")
    raise click.exceptions.Exit(int(result.exit_code))
