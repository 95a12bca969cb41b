"""Checks on output paths, made before any long work starts."""

from pathlib import Path

from .errors import KvcError


def check_output(output: Path) -> None:
    if output.is_dir():
        raise KvcError(f"output {output} is a directory")
    if not output.parent.is_dir():
        raise KvcError(f"output folder {output.parent} does not exist")
