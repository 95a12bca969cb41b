"""What every command shares: errors as one `error: ...` line, JSON output, and the options several take."""

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kvc_format import ExportError, KvcFormatError, KvcReader

from ..errors import KvcError, UsageError

try:  # typer 0.2x vendors its own click, whose exceptions are not click's
    from typer._click import exceptions as click_exceptions
except ImportError:
    from click import exceptions as click_exceptions


def fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def cli_errors(command):
    """Turn every failure into one line on stderr, never a traceback (KVC_DEBUG=1 shows one)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UsageError as exc:
            fail(str(exc), 2)
        except KvcError as exc:
            fail(str(exc))
        except KvcFormatError as exc:
            fail(f"invalid .kvc file: {exc}")
        except ExportError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", 130)
        except MemoryError:
            fail("out of memory; try a smaller --chunk-size or a shorter document")
        except BrokenPipeError:  # the reader of stdout went away (`kvc inspect f.kvc | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        except Exception as exc:
            if os.environ.get("KVC_DEBUG"):
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (run with KVC_DEBUG=1 for a traceback)")

    return wrapper


class OneLineErrors(typer.core.TyperGroup):
    """The command group: a usage error (unknown option, bad value, missing option) is one `error: ...` line and
    exit code 2, like kvc's own checks, instead of click's boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help())
            code = 2
        except click_exceptions.UsageError as exc:
            where = f" ({exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            message = exc.format_message().replace("Value error, ", "")  # pydantic's prefix, in typer's checks
            typer.echo(f"error: {message}{where}", err=True)
            code = 2
        except click_exceptions.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except typer.Abort:
            typer.echo("error: interrupted", err=True)
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def emit_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def open_reader(path: Path) -> KvcReader:
    if not path.exists():
        raise KvcError(f"{path} does not exist")
    if path.is_dir():
        raise KvcError(f"{path} is a directory, not a .kvc file")
    return KvcReader(path)


def choice(name: str, names) -> type[Enum]:
    """An option's choices as typer takes them (an Enum), made from a registry's names so the two never drift."""
    return Enum(name, [(n, n) for n in names], type=str)


def value(chosen: Enum | None) -> str | None:
    """The registry name of a chosen choice (None: not given)."""
    return None if chosen is None else chosen.value


ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model: smollm2 (embedded, the default) or gemma3 "
                                          "(packaged), a hub id, a model folder or a .gguf file (`kvc models`).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[str, typer.Option(help="Model dtype: auto (float32 on CPU, bfloat16 on CUDA), bfloat16, "
                                          "float16, float32.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]
