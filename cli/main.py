"""``convfuse`` command group. Each subcommand lives in its own module and is registered here.

Every way the command can end is one of the exit codes in :mod:`convfuse_cli.options`, with at
most one line on stderr: click's usage errors are reworded to ``convfuse: error: ...`` and an
exception convfuse did not expect becomes ``convfuse: internal error: ...`` (exit 3), never a
traceback (set ``CONVFUSE_TRACEBACK=1`` to see one when reporting a bug).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from convfuse import __version__
from convfuse.errors import internal_message, one_line

from .inspect_cmd import inspect
from .merge import merge
from .options import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED
from .verify_cmd import verify

__all__ = ["main", "ConvfuseGroup"]

_NO_ARGS: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _finish(code: int, line: str | None = None) -> NoReturn:
    if line is not None:
        click.echo(line, err=True)
    sys.exit(code)


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past click (which would print a blank line for it)."""


class ConvfuseGroup(click.Group):
    """A click group whose ``main`` turns every ending into an exit code and at most one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # an embedding caller handles exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS as e:  # bare `convfuse`: the help is the answer (click >= 8.2)
            _finish(EXIT_BAD_INPUT, e.format_message())
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            _finish(e.exit_code, f"convfuse: error: {one_line(e.format_message())}{hint}")
        except click.ClickException as e:
            _finish(e.exit_code, f"convfuse: error: {one_line(e.format_message())}")
        except (_Interrupted, click.Abort, KeyboardInterrupt):  # Abort: click's form of Ctrl-C / EOF
            _finish(EXIT_INTERRUPTED, "convfuse: interrupted; nothing written")
        except MemoryError:
            _finish(EXIT_INTERNAL, "convfuse: internal error: out of memory")
        except OSError as e:
            if e.errno == errno.EPIPE:  # `convfuse ... | head`: the reader left
                sys.exit(1)
            _internal(e)
        except Exception as e:  # noqa: BLE001 - last resort: a bug in convfuse, never a traceback
            _internal(e)
        sys.exit(code if isinstance(code, int) else 0)


def _internal(error: BaseException) -> NoReturn:
    if os.environ.get("CONVFUSE_TRACEBACK"):
        traceback.print_exception(error)
    _finish(EXIT_INTERNAL, f"convfuse: {internal_message(error)}")


@click.group(cls=ConvfuseGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convfuse")
def main() -> None:
    """Merge runs of linear convolutions into one exactly equivalent convolution."""


main.add_command(merge)
main.add_command(inspect)
main.add_command(verify)

if __name__ == "__main__":  # pragma: no cover
    main()
