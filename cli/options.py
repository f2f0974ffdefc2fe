"""Options and arguments shared by the commands, each defined once, and the exit codes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from convfuse.errors import ConvfuseError, ExitCode
from convfuse.policy import Policy
from convfuse.timing import DEFAULT_BUDGET, LATENCY_DEVICES
from convfuse.verify.inputs import DEVICES, parse_shape

__all__ = [
    "EXIT_OK",
    "EXIT_VERIFY_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL",
    "EXIT_UNVERIFIED",
    "EXIT_INTERRUPTED",
    "model_argument",
    "output_option",
    "policy_option",
    "json_option",
    "verbose_option",
    "html_option",
    "verify_option",
    "in_place_option",
    "allow_unverified_option",
    "shape_option",
    "parse_shapes",
    "verify_device_option",
    "inputs_option",
    "samples_option",
    "seed_option",
    "rtol_option",
    "atol_option",
    "attribution_option",
]

# The exit codes are the library's (convfuse.errors.ExitCode), one constant each.
EXIT_OK = ExitCode.OK
EXIT_VERIFY_FAILED = ExitCode.VERIFY_FAILED
EXIT_BAD_INPUT = ExitCode.BAD_INPUT
EXIT_INTERNAL = ExitCode.INTERNAL
EXIT_UNVERIFIED = ExitCode.UNVERIFIED
EXIT_INTERRUPTED = ExitCode.INTERRUPTED

# The library checks the file itself (missing, directory, empty, corrupt) so that every bad
# input gets the same one-line error; click only passes the path through.
model_argument = click.argument(
    "model", metavar="MODEL.onnx", type=click.Path(path_type=Path, readable=False)
)

output_option = click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    metavar="OUT.onnx",
    help="Where to write the fused model [default: MODEL.fused.onnx beside the input].",
)

_F = TypeVar("_F", bound=Callable[..., object])


def policy_option(f: _F) -> _F:
    """``--policy``, and the ``--device`` and ``--latency-budget`` the latency policy times with."""
    f = click.option(
        "--latency-budget",
        type=click.FloatRange(min=0),
        default=DEFAULT_BUDGET,
        show_default=True,
        metavar="SECONDS",
        help="Total time the latency policy spends timing; later candidates follow the flops rule.",
    )(f)
    f = click.option(
        "--device",
        type=click.Choice(list(LATENCY_DEVICES)),
        default="cpu",
        show_default=True,
        help="Where the latency policy times candidate merges (cuda: error if absent).",
    )(f)
    return click.option(
        "--policy",
        type=click.Choice([p.value for p in Policy]),
        default=Policy.FLOPS.value,
        show_default=True,
        help="flops: merge only what does not increase MACs or parameters; always: every exact merge; "
        "latency: the merges ONNX Runtime measures faster (see --device, --latency-budget).",
    )(f)


def json_option(f: _F) -> _F:
    """``--json``: the report (merge, inspect) or result (verify) as JSON, nothing else on stdout."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print the report (verify: the result) as JSON, nothing else."
    )(f)


verbose_option = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="List every merge and decline, grouped by block in graph order "
    "[default: counts per kind and reason].",
)


def html_option(help: str) -> Callable[[_F], _F]:
    """``--html PATH``: where to write the self-contained page of a verification (``help`` says when)."""
    return click.option(
        "--html", "html_path", type=click.Path(path_type=Path), default=None, metavar="PAGE.html", help=help
    )


verify_option = click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check the fused model against the input with ONNX Runtime before writing it.",
)

in_place_option = click.option(
    "--in-place",
    is_flag=True,
    help="Replace MODEL.onnx with the fused model "
    "(atomically, after verification; not with -o or --no-verify).",
)

allow_unverified_option = click.option(
    "--allow-unverified",
    is_flag=True,
    help="Write the fused model even where the input cannot be run here to verify it (custom "
    "operators, no input size it runs at); otherwise that is exit 4 and nothing is written.",
)

shape_option = click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=DIMS",
    help="Shape of an input with symbolic dims, e.g. input=1x3x224x224 (repeatable) "
    "[default: batch 2, spatial sizes derived from the graph].",
)


def parse_shapes(shapes: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    """``--shape NAME=DIMS`` values by input name (``None`` when none); a bad one is a usage error."""
    try:
        return dict(parse_shape(s) for s in shapes) or None
    except ConvfuseError as exc:
        raise click.UsageError(exc.message) from None


# --------------------------------------------------------------------------- convfuse verify
verify_device_option = click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="cpu",
    show_default=True,
    help="Where to run: cpu, cuda (error if absent), or all (cpu plus cuda when present).",
)

inputs_option = click.option(
    "--inputs",
    "inputs_file",
    type=click.Path(),
    default=None,
    help="Run on these inputs (.npz, one array per input name) instead of random ones.",
)

samples_option = click.option(
    "--samples", type=click.IntRange(min=1), default=2, show_default=True, help="Random input sets to run."
)

seed_option = click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the random inputs."
)

rtol_option = click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=None,
    help="Relative tolerance, as a fraction of max |reference output| [default: per dtype].",
)

atol_option = click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Absolute tolerance added to the relative one [default: 0].",
)

attribution_option = click.option(
    "--attribution/--no-attribution",
    default=True,
    show_default=True,
    help="On a mismatch, name the first diverging node(s) by comparing shared tensors.",
)
