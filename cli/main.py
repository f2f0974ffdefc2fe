"""``convfuse`` command group. Each subcommand lives in its own module and is registered here."""

from __future__ import annotations

import click

from convfuse import __version__

from .inspect_cmd import inspect
from .merge import merge
from .verify_cmd import verify

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convfuse")
def main() -> None:
    """Merge runs of linear convolutions into one exactly equivalent convolution."""


main.add_command(merge)
main.add_command(inspect)
main.add_command(verify)

if __name__ == "__main__":  # pragma: no cover
    main()
