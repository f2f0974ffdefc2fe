"""Printing shared by the commands: the report, progress on stderr, one-line failures."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

import click

from convfuse.errors import ConvfuseError, ExitCode, one_line
from convfuse.report import Report

__all__ = ["fail", "progress", "emit", "use_colour"]


def fail(path: Path | str, error: ConvfuseError | str, code: int = ExitCode.BAD_INPUT) -> NoReturn:
    """Print ``convfuse: error: PATH: CAUSE`` on one line of stderr and exit with ``code``
    (the error's own file when it names one, else ``path``)."""
    if isinstance(error, ConvfuseError) and error.path is not None:
        line = str(error)
    else:
        line = f"{path}: {error}"
    click.echo(f"convfuse: error: {one_line(line)}", err=True)
    raise click.exceptions.Exit(int(code))


def progress() -> Callable[[str], None]:
    """A progress sink: ``convfuse: [  1.2s] MESSAGE`` on stderr, seconds since it was made
    (the library sends messages only for large models and latency timing)."""
    start = time.monotonic()

    def say(message: str) -> None:
        click.echo(f"convfuse: [{time.monotonic() - start:6.1f}s] {message}", err=True)

    return say


def use_colour(stream: TextIO | None = None) -> bool:
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
