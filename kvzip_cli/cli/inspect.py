"""`kvc inspect` and `kvc verify`: a file's report, and its every checksum (no model)."""

from pathlib import Path
from typing import Annotated

import typer

from kvc_format import KvcFormatError

from ..errors import KvcError, UsageError
from ..report import report
from .common import DeviceOption, JsonOption, cli_errors, emit_json, fail, open_reader

FileArgument = Annotated[Path, typer.Argument(help="The .kvc file.", show_default=False, metavar="FILE")]


@cli_errors
def inspect(
    file: FileArgument,
    estimate: Annotated[bool, typer.Option("--estimate", help="Measure what the file lost now (loads its model; for "
                                           "a file made without an estimate).")] = False,
    document: Annotated[Path | None, typer.Option(help="--estimate: the document the file was made from (default: "
                                                  "the one it names).", show_default=False)] = None,
    device: DeviceOption = "auto",
    json_output: JsonOption = False,
):
    """Show what a .kvc file holds: its document and model, settings, sizes, and what it lost (its estimate)."""
    with open_reader(file) as reader:
        info = report(reader)
    if estimate:
        info = _estimated(file, info, document, device)
    elif document is not None:
        raise UsageError("--document is read by --estimate")
    if json_output:
        emit_json(info.as_json())
        return
    for line in info.lines():
        typer.echo(line)


def _estimated(file: Path, info, document: Path | None, device: str):
    """The report with the file's loss measured here, from its document (checked: its tokens must be the file's)."""
    from dataclasses import replace

    from ..document import read_document

    source = document or info.info["document"].get("name")
    if not source or source == "-":
        raise KvcError(f"{file} does not name its document (made from stdin, or by kvc before 0.7): give --document")
    text = read_document(str(source))
    from ..evaluation.estimate import estimate_file
    from ..models.files import EMBEDDED
    from ..models.loading import load_model

    lm = load_model(info.info["model"] or EMBEDDED, device=device)
    measured = estimate_file(file, text, lm)
    return replace(info, info={**info.info, "estimate": measured, "estimate_measured_here": True})


@cli_errors
def verify(file: FileArgument, json_output: JsonOption = False):
    """Check a .kvc file's structure, every checksum, and that every stream decodes (no model needed)."""
    try:
        with open_reader(file) as reader:
            reader.verify()
            sections = reader.geometry.layers
    except (KvcError, KvcFormatError) as exc:
        message = str(exc) if isinstance(exc, KvcError) else f"invalid .kvc file: {exc}"
        if json_output:
            emit_json({"ok": False, "file": str(file), "error": message})
        fail(message)
    if json_output:
        emit_json({"ok": True, "file": str(file), "sections": sections})
    else:
        typer.echo(f"{file}: ok ({sections} layer sections, all checksums match)")
