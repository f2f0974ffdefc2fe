"""``convfuse verify REFERENCE CANDIDATE``: compare two ONNX models; exit 0 match, 1 mismatch, 2 error."""

from __future__ import annotations

import json
from pathlib import Path

import click

from convfuse.errors import ConvfuseError
from convfuse.report_html import html_page, write_page
from convfuse.runtime import DEVICES, load_inputs, parse_shape
from convfuse.verify import verify_onnx

from .options import html_option, shape_option

__all__ = ["verify"]

#: Exit code for unusable input or an unavailable device (click uses 2 for usage errors too).
EXIT_ERROR = 2


@click.command("verify")
@click.argument("reference", type=click.Path(readable=False))
@click.argument("candidate", type=click.Path(readable=False))
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="cpu",
    show_default=True,
    help="Where to run: cpu, cuda (error if absent), or all (cpu plus cuda when present).",
)
@click.option(
    "--inputs",
    "inputs_file",
    type=click.Path(),
    default=None,
    help="Run on these inputs (.npz, one array per input name) instead of random ones.",
)
@shape_option
@click.option(
    "--samples", type=click.IntRange(min=1), default=2, show_default=True, help="Random input sets to run."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=None,
    help="Relative tolerance, as a fraction of max |reference output| [default: per dtype].",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Absolute tolerance added to the relative one [default: 0].",
)
@click.option(
    "--attribution/--no-attribution",
    default=True,
    show_default=True,
    help="On a mismatch, name the first diverging node(s) by comparing shared tensors.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@html_option(
    "Also write the result as one self-contained HTML page (verdict, errors, attribution, error maps)."
)
@click.pass_context
def verify(
    ctx: click.Context,
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
        shape_map = dict(parse_shape(s) for s in shapes)
        inputs = load_inputs(inputs_file) if inputs_file is not None else None
        result = verify_onnx(
            reference,
            candidate,
            device=device,
            samples=samples,
            seed=seed,
            shapes=shape_map or None,
            inputs=inputs,
            rtol=rtol,
            atol=atol,
            attribution=attribution,
        )
        if html_path is not None:
            write_page(html_path, html_page(result))
    except ConvfuseError as e:
        message = " ".join(str(e).split())
        click.echo(f"convfuse: error: {message}", err=True)
        ctx.exit(EXIT_ERROR)
    click.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False) if as_json else result.to_text())
    if html_path is not None and not as_json:
        click.echo(f"wrote {html_path}")
    ctx.exit(result.exit_code)
