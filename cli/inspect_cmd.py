"""``convfuse inspect MODEL.onnx``: the plan and report of ``merge``, writing nothing."""

from __future__ import annotations

from pathlib import Path

import click

from convfuse import files
from convfuse.errors import ConvfuseError

from . import _run
from .options import json_option, model_argument, policy_option, verbose_option

__all__ = ["inspect"]


@click.command("inspect", short_help="Show what merge would do; write nothing.")
@model_argument
@policy_option
@json_option
@verbose_option
def inspect(
    model: Path, policy: str, device: str, latency_budget: float, as_json: bool, verbose: bool
) -> None:
    """Show what `convfuse merge` would merge and decline in MODEL.onnx, without writing anything."""
    try:
        report = files.inspect_file(
            model, policy=policy, device=device, latency_budget=latency_budget, progress=_run.progress()
        )
    except ConvfuseError as exc:
        _run.fail(model, exc)
    _run.emit(report, as_json, extra={"input": str(model), "output": None}, verbose=verbose)
