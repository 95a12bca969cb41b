"""`kvc verify` and `kvc load` refuse every crafted hostile file (tests/format/attacks.py) with one line."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvzip_cli.cli import app

from attacks import write_crafted


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    return write_crafted(tmp_path_factory.mktemp("attacks"))


def test_kvc_verify_and_load_print_one_line(crafted, tiny_folder):
    runner = CliRunner()
    for name, path in crafted.items():
        for argv in (["verify", str(path)], ["load", str(path), "--model", str(tiny_folder)]):
            result = runner.invoke(app, argv)
            lines = result.stderr.strip().splitlines()
            assert result.exit_code == 1, (name, argv, result.output)
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, argv, result.stderr)
            assert "Traceback" not in result.output and "internal error" not in result.output
