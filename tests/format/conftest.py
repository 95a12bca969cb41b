"""Tests of the torch-free `kvc_format` package alone: the container, its codecs, the golden files, the spec-only
reader, the crafted hostile files and the fuzzer. Nothing here imports torch, transformers or kvzip_cli, so after
`pip install ./format` (plus pytest and hypothesis) `python -m pytest tests/format --confcutdir tests/format` runs
them all (`make test` does, in a clean `.venv-format`)."""

from pathlib import Path

import pytest

from attacks import write_crafted


@pytest.fixture(scope="session")
def crafted(tmp_path_factory) -> dict[str, Path]:
    """One crafted hostile file per attack (tests/format/attacks.py), by its id."""
    return write_crafted(tmp_path_factory.mktemp("attacks"))
