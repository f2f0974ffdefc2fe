"""Options and arguments shared by the commands, each defined once, and the exit codes."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = [
    "EXIT_OK",
    "EXIT_VERIFY_FAILED",
    "EXIT_BAD_INPUT",
    "model_argument",
    "output_option",
    "policy_option",
    "json_option",
    "verify_option",
]

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1  # the fused model does not compute what the input computes; nothing written
EXIT_BAD_INPUT = 2  # unreadable model, unwritable output, bad usage (click uses 2 for usage too)

# The library checks the file itself (missing, directory, empty, corrupt) so that every bad
# input gets the same one-line error; click only passes the path through.
model_argument = click.argument("model", metavar="MODEL.onnx", type=click.Path(path_type=Path))

output_option = click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    metavar="OUT.onnx",
    help="Where to write the fused model [default: MODEL.fused.onnx beside the input].",
)

policy_option = click.option(
    "--policy",
    type=click.Choice(["flops", "always"]),
    default="flops",
    show_default=True,
    help="flops: merge only what does not increase MACs or parameters; always: every exact merge.",
)

json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the report as JSON (nothing else on stdout).",
)

verify_option = click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check the fused model against the input with ONNX Runtime before writing it.",
)
