"""Options and arguments shared by the commands, each defined once, and the exit codes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from convfuse.latency import DEFAULT_BUDGET, LATENCY_DEVICES
from convfuse.policy import Policy

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
]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1  # the fused model does not compute what the input computes; nothing written
EXIT_BAD_INPUT = 2  # unreadable model, unwritable output, bad usage (click uses 2 for usage too)
EXIT_INTERNAL = 3  # a bug in convfuse (an exception it did not expect) or out of memory; never bad input
EXIT_UNVERIFIED = 4  # the input cannot be run here (custom operators, no size it runs at): not verified
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it); nothing written

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


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the report as JSON (nothing else on stdout).",
)

verbose_option = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="List every merge and decline, grouped by block in graph order [default: counts per kind and reason].",
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
    help="Replace MODEL.onnx with the fused model (atomically, after verification; not with -o or --no-verify).",
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
