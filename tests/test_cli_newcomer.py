"""What a new user hit, fixed: cheap errors before torch loads, one error style, short help, streamed answers, the
loss estimate shown by compress, inspect and load, and the numpy decoder said once."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvc_format import KvcReader
from kvzip_cli.cli import app

runner = CliRunner()

# Runs `kvc ARGS` in a fresh interpreter and reports whether torch was imported by the time it exited.
PROBE = """
import sys
from kvzip_cli.cli import main
sys.argv = ["kvc", *sys.argv[1:]]
try:
    main()
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def kvc_in_a_fresh_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, code, fragment", [
    (["compress", "nothere.txt", "-o", "x.kvc"], 1, "document nothere.txt does not exist"),
    (["compress", "doc.txt", "-o", "x.kvc", "--ratio", "2"], 2, "--ratio 2.0 is out of range"),
    (["load", "missing.kvc", "--prompt", "hi"], 1, "missing.kvc does not exist"),
    (["compress", "doc.txt", "-o", "x.kvc", "--preset", "huge"], 2, "'huge' is not one of"),
])
def test_cheap_errors_come_before_torch_is_imported(tmp_path, args, code, fragment):
    (tmp_path / "doc.txt").write_text("A short document.\n")
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], done.stderr
    assert lines[1:] == ["torch imported: False"]


@pytest.mark.parametrize("args, fragment", [
    (["compress", "doc.txt", "-o", "x.kvc", "--preset", "huge"], "Invalid value for '--preset'"),
    (["compress", "doc.txt"], "Missing option '--output'"),
    (["load", "x.kvc", "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    (["compress", "doc.txt", "-o", "x.kvc", "--no-such-option"], "No such option: --no-such-option"),
    (["bench", "lengths"], "Missing argument 'DOCUMENT'"),
])
def test_every_usage_error_is_one_error_line_and_exit_code_2(args, fragment):
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "╭" not in result.output and "Traceback" not in result.output


def test_help_is_short_and_points_to_the_docs():
    for command in ("compress", "load", "inspect", "export", "bench", "bench lengths"):
        result = run(*command.split(), "--help")
        assert result.exit_code == 0, result.output
        assert len(result.stdout.splitlines()) <= 70, (command, len(result.stdout.splitlines()))
    assert "docs/cli.md" in run("compress", "--help").stdout


def test_bench_lengths_is_its_own_command_and_the_flag_an_alias(tmp_path):
    missing = tmp_path / "nothere.txt"
    for args in (["bench", "lengths", missing, "--lengths", "1k"], ["bench", missing, "--lengths", "1k"]):
        result = run(*args)
        assert result.exit_code == 1 and "does not exist" in result.stderr, result.output
    several = run("bench", missing, "--lengths", "1k", "--presets", "lossless,balanced,small")
    assert several.exit_code == 2 and "one preset" in several.stderr, several.output  # even the three by name


@pytest.fixture(scope="module")
def estimated(tmp_path_factory, tiny_folder, short_doc):
    out = tmp_path_factory.mktemp("estimate") / "doc.kvc"
    result = run("compress", short_doc, "-o", out, "--model", tiny_folder)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_compress_records_and_shows_the_files_loss_estimate(estimated, short_doc):
    path, shown = estimated
    with KvcReader(path) as reader:
        reader.verify()
        estimate, document = reader.header["estimate"], reader.header["document"]
    assert estimate["method"] == "self-check" and estimate["probes"] >= 4 and estimate["positions"] > 0
    assert 0 <= estimate["top1"] <= 1 and estimate["kld"] >= 0
    assert document["name"] == str(short_doc)
    assert f"top1 {estimate['top1']:.3f}, kld {estimate['kld']:.4f}" in shown


def test_inspect_and_load_show_the_estimate_and_the_document(estimated, short_doc, tiny_folder):
    path, _ = estimated
    shown = run("inspect", path).stdout
    assert f"document     {short_doc}" in shown and "loss         top1 " in shown
    info = json.loads(run("inspect", path, "--json").stdout)
    assert info["estimate"]["probes"] >= 4 and info["document"]["name"] == str(short_doc)
    loaded = run("load", path, "--model", tiny_folder)
    assert loaded.exit_code == 0, loaded.output
    assert "estimated loss: top1 " in loaded.stdout


def test_inspect_estimate_measures_a_file_made_without_one_as_compress_would(tmp_path, estimated, short_doc,
                                                                             tiny_folder):
    path, _ = estimated
    bare = tmp_path / "bare.kvc"
    result = run("compress", short_doc, "-o", bare, "--model", tiny_folder, "--no-estimate", "--threads", "2")
    assert result.exit_code == 0, result.output
    assert "loss" not in result.stdout
    assert "none recorded" in run("inspect", bare).stdout
    measured = json.loads(run("inspect", bare, "--estimate", "--json").stdout)["estimate"]
    with KvcReader(path) as reader:
        recorded = reader.header["estimate"]
    assert measured["probes"] == recorded["probes"] and measured["positions"] == recorded["positions"]
    assert measured["top1"] == pytest.approx(recorded["top1"], abs=0.02)
    other = tmp_path / "other.txt"
    other.write_text(short_doc.read_text()[:1500])
    refused = run("inspect", bare, "--estimate", "--document", other)
    assert refused.exit_code == 1 and "was not made from this document" in refused.stderr


def test_answers_stream_to_a_terminal_as_they_are_decoded(estimated, tiny_folder, monkeypatch):
    from kvzip_cli.cli import load as load_command

    pieces = []
    monkeypatch.setattr(load_command, "stdout_is_terminal", lambda: True)
    real = load_command._Stream.__call__
    monkeypatch.setattr(load_command._Stream, "__call__", lambda self, text: (pieces.append(text), real(self, text)))
    path, _ = estimated
    streamed = run("load", path, "--model", tiny_folder, "--prompt", "Who may copy it?", "--max-new-tokens", "12")
    assert streamed.exit_code == 0, streamed.output
    whole = json.loads(run("load", path, "--model", tiny_folder, "--prompt", "Who may copy it?",
                           "--max-new-tokens", "12", "--json").stdout)["answer"]
    assert len(pieces) > 1 and "".join(pieces).strip() == whole
    assert streamed.stdout.startswith(whole)


def test_a_load_decoding_with_numpy_for_want_of_numba_says_so_once(estimated, tiny_folder, monkeypatch):
    from kvzip_cli.cli import load as load_command

    monkeypatch.setenv("KVC_RANS_DECODER", "numpy")
    path, _ = estimated
    quiet = run("load", path, "--model", tiny_folder)
    assert load_command.NUMPY_DECODER_NOTE not in quiet.stderr  # numba is here: numpy was asked for
    monkeypatch.setattr(load_command, "numba_installed", lambda: False)
    noted = run("load", path, "--model", tiny_folder, "--prompt", "a", "--prompt", "b", "--max-new-tokens", "2")
    assert noted.exit_code == 0, noted.output
    assert noted.stderr.count(load_command.NUMPY_DECODER_NOTE) == 1


def test_the_main_package_depends_on_its_compiled_decoder():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("numba") for d in project["dependencies"])
