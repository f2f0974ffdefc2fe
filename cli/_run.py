"""Plumbing shared by ``merge`` and ``inspect``: load, fuse, print, fail with one line."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from convfuse import fuse_onnx
from convfuse.errors import ConvfuseError
from convfuse.frontends.onnx.io import LoadedModel, is_large, read_model
from convfuse.latency import DEFAULT_BUDGET
from convfuse.policy import Policy
from convfuse.report import Report

from .options import EXIT_BAD_INPUT

__all__ = ["fail", "load", "fuse", "emit", "use_colour", "LARGE_BYTES", "LARGE_NODES"]

#: Models this big get progress messages on stderr.
LARGE_BYTES = 50 * 2**20
LARGE_NODES = 300


def fail(path: Path | str, error: ConvfuseError | str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``convfuse: error: PATH: CAUSE`` on one line of stderr and exit with ``code``
    (the error's own file when it names one, else ``path``)."""
    if isinstance(error, ConvfuseError) and error.path is not None:
        line = str(error)
    else:
        line = f"{path}: {error}"
    click.echo(f"convfuse: error: {' '.join(line.split())}", err=True)
    raise click.exceptions.Exit(code)


def _say(start: float) -> Callable[[str], None]:
    def say(message: str) -> None:
        click.echo(f"convfuse: [{time.monotonic() - start:6.1f}s] {message}", err=True)

    return say


def load(path: Path) -> tuple[LoadedModel, Callable[[str], None] | None]:
    """Read ``path`` (exit 2 with one line if unusable) and a progress printer if it is large."""
    start = time.monotonic()
    try:
        big_file = path.is_file() and path.stat().st_size > LARGE_BYTES
    except OSError:
        big_file = False
    if big_file:
        _say(start)(f"loading {path}")
    try:
        loaded = read_model(path)
    except ConvfuseError as exc:
        fail(path, exc)
    large = loaded.total_bytes > LARGE_BYTES or len(loaded.model.graph.node) > LARGE_NODES
    if loaded.total_bytes > LARGE_BYTES:
        _say(start)(f"loaded {path} ({loaded.total_bytes / 2**20:,.0f} MiB)")
    return loaded, (_say(start) if large else None)


def fuse(
    path: Path,
    policy: str,
    device: str = "cpu",
    latency_budget: float = DEFAULT_BUDGET,
    keep_input: bool = True,
) -> tuple[LoadedModel, Any, Report, Callable[[str], None] | None]:
    """Load and fuse; every ConvfuseError becomes exit 2 naming ``path``. Returns the loaded
    input, the fused model, the report and the progress printer (``None`` for small models).

    ``keep_input=False``, or a model over 2 GiB, fuses the loaded model itself (``fused is
    loaded.model``) rather than a copy: one copy of every weight in memory, not two. The
    latency policy always reports progress on stderr (timing takes seconds).
    """
    loaded, progress = load(path)
    if progress is None and policy == Policy.LATENCY.value:
        progress = _say(time.monotonic())
    inplace = not keep_input or is_large(loaded.model)
    try:
        fused, report = fuse_onnx(
            loaded,  # checked once, by read_model
            policy=policy,
            progress=progress,
            device=device,
            latency_budget=latency_budget,
            inplace=inplace,
        )
    except ConvfuseError as exc:
        fail(path, exc)
    return loaded, fused, report, progress


def use_colour(stream: Any = None) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org)."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _width() -> int:
    """80 columns, or fewer on a narrower terminal."""
    return max(40, min(80, shutil.get_terminal_size((80, 24)).columns))


def emit(
    report: Report,
    as_json: bool,
    extra: dict[str, Any] | None = None,
    lines: tuple[str, ...] = (),
    verbose: bool = False,
) -> None:
    """Print the report: the summary (or ``verbose`` listing) with ``lines`` after it, or JSON
    with ``extra`` keys (only JSON)."""
    if as_json:
        payload = report.to_dict()
        payload.update(extra or {})
        click.echo(json.dumps(payload, indent=2))
        return
    colour = use_colour()
    text = (report.verbose if verbose else report.summary)(width=_width(), colour=colour)
    click.echo(text, color=colour)
    for line in lines:
        click.echo(line)
