"""`kvc compress` on a corpus with the local engine, through the CLI, on a tiny random-weight model: one .kvc per
document and a manifest row each, per-document errors that do not stop the run, a rerun that skips what is done
and verified, Ctrl-C, the dispatch between one document and a corpus, and files equal to the single-document
command's."""

import builtins
import importlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvc_format import KvcReader
from kvzip_cli.cli import app

from fixtures import DOCS
from kvc_compare import assert_same_cache

runner = CliRunner()
ROW_KEYS = {"source", "digest", "output", "status", "error", "tokens", "file_bytes", "compression", "seconds"}
SUMMARY_KEYS = {"documents", "ok", "skipped", "errors", "seconds", "manifest"}
# Pruned with the refit (thread-sensitive least squares), quantized and entropy-coded: every stage of the writer.
SETTINGS = ("--ratio", "0.5", "--scorer", "knorm", "--bits", "4")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Three small documents, a file that is not UTF-8 and an empty one, in a folder with a subfolder."""
    folder = tmp_path / "docs"
    (folder / "more").mkdir(parents=True)
    text = DOCS.joinpath("apache-2.0.txt").read_text()
    for i, name in enumerate(["a.txt", "b.txt", "more/c.txt"]):
        (folder / name).write_text(text[i * 700 : (i + 1) * 700])
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "empty.txt").write_text("  \n")
    (folder / ".hidden").write_text("never read")
    return folder


def test_folder_one_file_per_document_and_errors_recorded(tmp_path, corpus, tiny_folder):
    out = tmp_path / "out"
    result = run("compress", corpus, "-o", out, "--model", tiny_folder, *SETTINGS, "--json")
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary.keys() >= SUMMARY_KEYS
    assert (summary["documents"], summary["ok"], summary["skipped"], summary["errors"]) == (5, 3, 0, 2)
    assert result.stderr.strip().splitlines() == [
        f"error: 2 of 5 documents failed: their errors are in {out / 'manifest.jsonl'}"]
    rows = manifest(out)
    assert [Path(r["source"]).name for r in rows] == ["a.txt", "b.txt", "empty.txt", "latin1.txt", "c.txt"]
    assert all(r.keys() >= ROW_KEYS for r in rows)
    by_name = {Path(r["source"]).name: r for r in rows}
    assert "is not UTF-8" in by_name["latin1.txt"]["error"] and "is empty" in by_name["empty.txt"]["error"]
    for row in rows:
        if row["status"] == "error":
            assert row["output"] is None and "\n" not in row["error"]
            continue
        assert row["status"] == "ok" and row["error"] is None and row["tokens"] > 0
        output = Path(row["output"])
        assert output.parent == out and output.stat().st_size == row["file_bytes"]
        with KvcReader(output) as reader:
            reader.verify()
            assert reader.header["document"]["sha256"] == row["digest"]
            assert reader.geometry.tokens == row["tokens"]
        assert output.name.startswith(Path(row["source"]).stem + "-" + row["digest"][:12] + "-")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [Path(r["output"]).name for r in rows if r["output"]] + ["manifest.jsonl"])


def test_rerun_skips_what_is_done_and_redoes_what_is_not(tmp_path, corpus, tiny_folder):
    out = tmp_path / "out"
    (corpus / "latin1.txt").unlink()
    (corpus / "empty.txt").unlink()
    first = run("compress", corpus, "-o", out, "--model", tiny_folder, *SETTINGS, "--json")
    assert first.exit_code == 0, first.output
    rows = manifest(out)
    again = run("compress", corpus, "-o", out, "--model", tiny_folder, *SETTINGS, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 3
    assert [r["status"] for r in manifest(out)] == ["skipped"] * 3
    assert [(r["tokens"], r["file_bytes"], r["output"]) for r in manifest(out)] == [
        (r["tokens"], r["file_bytes"], r["output"]) for r in rows]
    # present is not done: a truncated file is redone, and so is another document's file under this name
    a, b = (Path(r["output"]) for r in rows[:2])
    a.write_bytes(a.read_bytes()[:-100])
    b.write_bytes(Path(rows[2]["output"]).read_bytes())
    third = run("compress", corpus, "-o", out, "--model", tiny_folder, *SETTINGS, "--json")
    assert third.exit_code == 0, third.output
    assert [r["status"] for r in manifest(out)] == ["ok", "ok", "skipped"]
    for row in manifest(out):
        with KvcReader(row["output"]) as reader:
            reader.verify()
            assert reader.header["document"]["sha256"] == row["digest"]
    # other settings: other names, nothing skipped
    other = run("compress", corpus, "-o", out, "--model", tiny_folder, "--preset", "lossless", "--json")
    assert other.exit_code == 0 and json.loads(other.stdout)["ok"] == 3
    assert len(list(out.glob("*.kvc"))) == 6


def test_same_bytes_as_the_single_document_command(tmp_path, corpus, tiny_folder):
    out = tmp_path / "out"
    result = run("compress", corpus / "a.txt", corpus / "b.txt", "-o", out, "--model", tiny_folder, *SETTINGS)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"compressed 2 documents into {out}: 2 ok, 0 skipped (done before), 0 failed")
    progress = result.stderr.splitlines()  # no terminal: a start line, the phases' lines, a line per document
    assert progress[0] == "kvc compress: 2 documents to compress"
    documents = [line for line in progress if " ok " in line]
    assert [line.split(" ok ")[0] for line in documents] == ["kvc compress: [1/2]", "kvc compress: [2/2]"]
    assert "tokens/s, eta" in documents[0] and documents[1].endswith("tokens/s")
    assert any(line.startswith("kvc compress: [1/2] prefill ") for line in progress)
    for row in manifest(out):
        single = tmp_path / "single.kvc"
        result = run("compress", row["source"], "-o", single, "--model", tiny_folder, *SETTINGS, "--json")
        assert result.exit_code == 0, result.output
        assert_same_cache(Path(row["output"]), single)


def test_list_file_glob_and_one_file_into_a_folder(tmp_path, corpus, tiny_folder):
    listed = tmp_path / "list.jsonl"
    listed.write_text(json.dumps({"path": str(corpus / "a.txt")}) + "\n# a comment\n\n" +
                      json.dumps({"path": str(corpus / "more" / "c.txt"), "title": "c"}) + "\n")
    out = tmp_path / "out"
    result = run("compress", "--list", listed, "-o", out, "--model", tiny_folder, "--preset", "lossless", "--json")
    assert result.exit_code == 0, result.output
    assert [Path(r["source"]).name for r in manifest(out)] == ["a.txt", "c.txt"]
    plain = tmp_path / "list.txt"
    plain.write_text(f"{corpus / 'b.txt'}\n{corpus / 'missing.txt'}\n")
    result = run("compress", "--list", plain, "-o", out, "--model", tiny_folder, "--preset", "lossless", "--json")
    assert result.exit_code == 1
    assert [r["status"] for r in manifest(out)] == ["ok", "error"]
    assert "does not exist" in manifest(out)[1]["error"]
    result = run("compress", str(corpus / "*.txt"), "-o", out, "--model", tiny_folder, "--preset", "lossless",
                 "--json")
    assert [Path(r["source"]).name for r in manifest(out)] == ["a.txt", "b.txt", "empty.txt", "latin1.txt"]
    assert [r["status"] for r in manifest(out)] == ["skipped", "skipped", "error", "error"]
    # one file, -o an existing folder: a corpus of one; stdin stays a single document
    result = run("compress", corpus / "a.txt", "-o", out, "--model", tiny_folder, "--preset", "lossless", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["skipped"] == 1
    result = runner.invoke(app, ["compress", "-", "-o", str(out), "--model", str(tiny_folder)], input="text")
    assert result.exit_code == 1 and result.stderr.strip() == f"error: output {out} is a directory"


def test_a_document_too_long_for_the_model_is_a_row(tmp_path, corpus, tiny_folder):
    (corpus / "long.txt").write_text(DOCS.joinpath("gpl-3.txt").read_text() * 2)  # > 4096 tokens of the tiny model
    out = tmp_path / "out"
    result = run("compress", corpus / "a.txt", corpus / "long.txt", "-o", out, "--model", tiny_folder, "--preset",
                 "lossless", "--json")
    assert result.exit_code == 1
    rows = manifest(out)
    assert [r["status"] for r in rows] == ["ok", "error"] and "handles at most 4096" in rows[1]["error"]


def test_ctrl_c_leaves_the_finished_rows_and_no_partial_file(tmp_path, corpus, tiny_folder, monkeypatch):
    compress_module = importlib.import_module("kvzip_cli.compress.pipeline")
    real = compress_module.write_kvc
    outputs = []

    def interrupted_in_the_second_write(pre, output, **options):
        outputs.append(Path(output))
        if len(outputs) == 2:  # Ctrl-C after the first layer of the second document is written
            def task(description, total, steps=None):
                def advance(n=1):
                    raise KeyboardInterrupt
                return advance
            options["task"] = task
        return real(pre, output, **options)

    monkeypatch.setattr(compress_module, "write_kvc", interrupted_in_the_second_write)
    out = tmp_path / "out"
    # --no-estimate: each write is the output itself (with the estimate it is a temporary file, then the output)
    result = run("compress", corpus, "-o", out, "--model", tiny_folder, *SETTINGS, "--no-estimate")
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1].startswith("error: interrupted; ")
    rows = manifest(out)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and Path(rows[0]["output"]) == outputs[0]
    assert sorted(os.listdir(out)) == sorted([outputs[0].name, "manifest.jsonl"])


def test_usage_errors_exit_2_before_any_work(tmp_path, corpus, tiny_folder):
    out = tmp_path / "out"
    cases = [
        (["compress", corpus, "-o", out, "--bits", "5"], "use 16 or 32"),
        (["compress", corpus, "-o", out, "--address", "auto"], "--engine ray"),
        (["compress", corpus / "a.txt", "-o", tmp_path / "x.kvc", "--engine", "ray"], "apply to a corpus"),
        (["compress", corpus, "-", "-o", out], "stdin (-) is a single document"),
        (["compress", "-o", out], "give a DOCUMENT"),
    ]
    for args, fragment in cases:
        result = run(*args, "--model", tiny_folder)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and fragment in result.stderr
    assert not out.exists()
    existing_file = tmp_path / "file.kvc"
    existing_file.write_bytes(b"")
    result = run("compress", corpus, "-o", existing_file, "--model", tiny_folder)
    assert result.exit_code == 2 and "is a file" in result.stderr
    result = run("compress", str(tmp_path / "nothing*.txt"), "-o", out, "--model", tiny_folder)
    assert result.exit_code == 1 and "matches no file" in result.stderr


def test_engine_ray_without_ray_is_one_line(tmp_path, corpus, tiny_folder, monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = run("compress", corpus, "-o", tmp_path / "out", "--model", tiny_folder, "--engine", "ray")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --engine ray needs Ray Data: pip install 'kvc[ray]'"
