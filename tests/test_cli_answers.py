"""What a new user meets in `kvc load` and `kvc inspect`: several questions per load, answers cut at the token limit
marked, the prefill compared with a measured one, the preset shown, `kvc models`, and the commands that need no
model starting without torch."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvzip_cli.cli import app

from fixtures import tiny_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def kvc_file(tmp_path_factory, tiny_folder, short_doc):
    out = tmp_path_factory.mktemp("answers") / "doc.kvc"
    made = run("compress", short_doc, "-o", out, "--model", tiny_folder, "--preset", "lossless", "--ratio", "0.5",
               "--json")
    assert made.exit_code == 0, made.output
    return out


def test_every_question_is_answered_from_one_load(tmp_path, kvc_file):
    questions = tmp_path / "q.txt"
    questions.write_text("# a comment line\nWho may copy it?\n\nWhat is licensed?\n")
    result = run("load", kvc_file, "-p", "What is a work?", "-p", "Who is the licensor?", "--questions", questions,
                 "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    asked = [a["question"] for a in data["answers"]]
    assert asked == ["What is a work?", "Who is the licensor?", "Who may copy it?", "What is licensed?"]
    assert data["answer"] == data["answers"][0]["answer"] and data["stopped"] == data["answers"][0]["stopped"]
    for entry in data["answers"]:
        assert entry["stopped"] in ("eos", "length") and 1 <= entry["answer_tokens"] <= 4
        assert entry["stopped"] == "eos" or entry["answer_tokens"] == 4
        # the cache is reset between questions: each answer is what a load for that question alone gives
        alone = json.loads(run("load", kvc_file, "-p", entry["question"], "--max-new-tokens", "4", "--json").stdout)
        assert alone["answer"] == entry["answer"]


def test_a_cut_answer_is_marked(kvc_file):
    cut = run("load", kvc_file, "-p", "What is licensed?", "--max-new-tokens", "2")
    data = json.loads(run("load", kvc_file, "-p", "What is licensed?", "--max-new-tokens", "2", "--json").stdout)
    assert cut.exit_code == 0, cut.output
    assert ("[cut at --max-new-tokens 2" in cut.stdout) == (data["stopped"] == "length")


def test_an_answer_that_ends_says_eos(tmp_path, tiny_tokenizer):
    """The tiny random model never chooses EOS by itself: make its first greedy token the EOS token."""
    from kvzip_cli import compress_text, load
    from kvzip_cli.load.answer import ask

    lm = tiny_model("llama", tiny_tokenizer)
    path = tmp_path / "d.kvc"
    compress_text("A short document about licences. " * 8, path, preset="lossless", model=lm)
    kv = load(path, lm)
    first = ask(lm.model, lm.tokenizer, kv, "Who?", 3)
    assert first.stopped == "length" and len(first.token_ids) == 3
    lm.model.generation_config.eos_token_id = first.token_ids[0]
    ended = ask(lm.model, lm.tokenizer, kv, "Who?", 3)
    assert ended.stopped == "eos" and ended.token_ids == first.token_ids[:1]


def test_blank_prompt_is_a_usage_error(kvc_file):
    result = run("load", kvc_file, "-p", "  ")
    assert result.exit_code == 2 and result.stderr.startswith("error: --prompt is empty")


def test_measure_prefill_compares_on_this_machine(kvc_file):
    data = json.loads(run("load", kvc_file, "--measure-prefill", "--json").stdout)
    assert data["rans_decoder"] is None  # a float file: no rANS decoder warmed up or reported
    assert data["prefill_here_seconds"] > 0
    assert data["speedup"] == pytest.approx(data["prefill_here_seconds"] / data["load_seconds"])
    text = run("load", kvc_file, "--measure-prefill")
    assert "prefilling the document here took" in text.stdout and "sooner" in text.stdout
    recorded = run("load", kvc_file)
    assert "when the file was made, maybe on another machine" in recorded.stdout and "sooner" not in recorded.stdout


def test_inspect_names_the_preset(tmp_path, tiny_folder, short_doc, kvc_file):
    shown = run("inspect", kvc_file)
    assert "preset       lossless, changed by --ratio" in shown.stdout
    assert "50.0% of entries kept (ratio 0.5, kvzip scores" in shown.stdout and "16-bit floats" in shown.stdout
    plain = tmp_path / "b.kvc"
    assert run("compress", short_doc, "-o", plain, "--model", tiny_folder, "--bits", "3").exit_code == 0
    settings = json.loads(run("inspect", plain, "--json").stdout)["settings"]
    assert settings["preset"] == "balanced" and settings["overrides"] == []  # --bits 3 is balanced's own
    assert "preset       balanced\n" in run("inspect", plain).stdout


def test_models_lists_aliases_families_and_conversions(tmp_path, monkeypatch):
    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / "M-0123456789abcdef-c2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    data = json.loads(run("models", "--json").stdout)
    packaged = {p["alias"]: p for p in data["packaged"]}
    assert packaged["smollm2"]["default"] and not packaged["gemma3"]["default"]
    assert "Gemma Terms of Use" in packaged["gemma3"]["terms"] and packaged["gemma3"]["gguf"] is None  # not assembled
    assert {"qwen2", "llama"} <= {a["alias"] for a in data["aliases"]}
    assert "Llama" in " ".join(data["families"]) and len(data["families"]) >= 10
    assert data["converted"] == [{"folder": str(folder), "bytes": 2}]
    text = run("models")
    assert text.exit_code == 0 and "qwen2" in text.stdout and "gemma3" in text.stdout and str(folder) in text.stdout


NO_MODEL = """
import sys
from kvzip_cli.cli import main
sys.argv = ["kvc", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    assert done.code in (0, None), done.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["verify", "{file}"], ["inspect", "{file}"], ["version"], ["--version"],
                                  ["export", "{file}", "-o", "{out}"], ["models"]])
def test_commands_without_a_model_import_no_torch(tmp_path, kvc_file, argv):
    args = [a.format(file=kvc_file, out=tmp_path / "o.safetensors") for a in argv]
    done = subprocess.run([sys.executable, "-c", NO_MODEL, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stderr, done.stderr
