"""The `kvc` command line: one module per command, each only parsing, calling the library and rendering. Errors
are one `error: ...` line: exit code 2 for a usage error, 1 for bad input or a failure. No command imports torch
before its arguments and files are checked."""

import signal
import sys
from typing import Annotated

import typer

from .. import __version__
from . import bench, compress, export, inspect, load, models
from .common import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: one line per option, no panels
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kvc {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool | None, typer.Option("--version", callback=_print_version, is_eager=True,
                                                          help="Print kvc's version and exit.")] = None):
    """Compress a long document into a small, reusable KV cache (.kvc) and answer questions from it.

    `kvc compress doc.txt -o doc.kvc`, then `kvc load doc.kvc --prompt "..."`. Exit codes: 0 success; 1 bad input
    or a failure, with one `error: ...` line; 2 a usage error. Guide: README.md and docs/.
    """


app.command()(compress.compress)
app.command()(load.load)
app.command()(inspect.inspect)
app.command()(inspect.verify)
app.command()(export.export)
app.add_typer(bench.app, name="bench")
app.command()(models.models)


@app.command()
def version():
    """Print kvc's version."""
    typer.echo(f"kvc {__version__}")


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="kvc")


if __name__ == "__main__":
    sys.exit(main())
