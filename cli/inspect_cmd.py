"""``convfuse inspect MODEL.onnx``: the plan and report of ``merge``, writing nothing."""

from __future__ import annotations

from pathlib import Path

import click

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
    _, _, report, _ = _run.fuse(model, policy, device, latency_budget, keep_input=False)
    _run.emit(report, as_json, extra={"input": str(model), "output": None}, verbose=verbose)
