"""Every command through typer's CliRunner, the JSON contract, and one-line errors with exit code 1."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvc_format import MINOR_VERSION
from kvc_format.atomic import AtomicFile
from kvzip_cli.cli import app
from kvzip_cli.compress.presets import PRESETS

runner = CliRunner()
CONTRACT = {
    "compress": {"output", "tokens", "kept_ratio", "raw_bytes", "file_bytes", "compression", "seconds"},
    "load": {"answer", "load_seconds", "generate_seconds", "prefill_seconds", "model"},
    "inspect": {"version", "model", "tokens", "kept_ratio", "file_bytes", "settings"},
    "verify": {"ok"},
}


def run(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, fragment: str, code: int = 1):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def kvc_file(tmp_path_factory, tiny_folder, short_doc) -> Path:
    out = tmp_path_factory.mktemp("cli") / "doc.kvc"
    result = run("compress", short_doc, "-o", out, "--model", tiny_folder, "--json")
    assert result.exit_code == 0, result.output
    return out


def test_compress_json_contract(tmp_path, tiny_folder, short_doc):
    out = tmp_path / "d.kvc"
    result = run("compress", short_doc, "-o", out, "--model", tiny_folder, "--preset", "lossless", "--codec", "raw",
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert CONTRACT["compress"] <= data.keys()
    assert data["output"] == str(out) and data["file_bytes"] == out.stat().st_size
    assert data["kept_ratio"] == 1.0 and data["compression"] == pytest.approx(data["raw_bytes"] / data["file_bytes"])


def test_compress_text_summary_and_stdin(tmp_path, tiny_folder, short_doc):
    out = tmp_path / "d.kvc"
    result = run("compress", "-", "-o", out, "--model", tiny_folder, input=short_doc.read_text())
    assert result.exit_code == 0, result.output
    assert "compressed stdin" in result.stdout and "compression" in result.stdout
    assert out.exists()


@pytest.mark.parametrize("scorer,allocation", [("kvzip", "global"), ("compactor", "layer"), ("knorm", "head"),
                                               ("knorm", "position")])
def test_pruned_file_through_every_command(tmp_path, tiny_folder, short_doc, scorer, allocation):
    out = tmp_path / "p.kvc"
    made = run("compress", short_doc, "-o", out, "--model", tiny_folder, "--preset", "lossless", "--ratio", "0.4",
               "--scorer", scorer, "--allocation", allocation, "--json")
    assert made.exit_code == 0, made.output
    data = json.loads(made.stdout)
    assert data["kept_ratio"] == pytest.approx(0.4, abs=1e-3) and data["scorer"] == scorer
    assert data["compression"] > 2.5  # 0.4 of the entries, zstd on top
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["cache"]["layout"] == "pruned" and info["kept_ratio"] == pytest.approx(0.4, abs=1e-3)
    assert info["settings"]["scorer"] == scorer and info["settings"]["allocation"] == allocation
    per_layer = [layer["kept_ratio"] for layer in info["layers"]]
    if allocation == "layer":
        assert per_layer == pytest.approx([0.4] * 3, abs=1e-3)
    if allocation == "position":  # the same positions in every layer and head
        assert per_layer == [info["kept_ratio"]] * 3
        assert info["kept_ratio"] == round(0.4 * info["tokens"]) / info["tokens"]
    assert "per layer" in run("inspect", out).stdout
    assert json.loads(run("verify", out, "--json").stdout)["ok"] is True
    answer = run("load", out, "--prompt", "What is licensed?", "--max-new-tokens", "4", "--json")
    assert answer.exit_code == 0, answer.output
    assert isinstance(json.loads(answer.stdout)["answer"], str)


def test_load_with_prompt_json(kvc_file):
    result = run("load", kvc_file, "--prompt", "What is licensed?", "--max-new-tokens", "5", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert CONTRACT["load"] <= data.keys()
    assert isinstance(data["answer"], str) and data["prefill_seconds"] > 0 and data["load_seconds"] > 0


def test_load_without_prompt_times_the_load(kvc_file):
    result = run("load", kvc_file)
    assert result.exit_code == 0, result.output
    assert "loaded" in result.stdout and "when the file was made" in result.stdout


def test_inspect(kvc_file):
    result = run("inspect", kvc_file, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert CONTRACT["inspect"] <= data.keys()
    assert data["version"] == f"1.{MINOR_VERSION}" and len(data["layers"]) == 3
    # the default preset, balanced: its kept ratio, 3-bit, entropy-coded
    balanced = PRESETS["balanced"].ratio
    assert data["cache"]["layout"] == "quantized" and data["kept_ratio"] == pytest.approx(balanced, abs=1e-3)
    assert data["settings"]["bits"] == 3 and data["settings"]["codec"] == "ans"
    text = run("inspect", kvc_file)
    assert text.exit_code == 0 and "sections" in text.stdout


def test_verify_ok(kvc_file):
    result = run("verify", kvc_file, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"ok": True, "file": str(kvc_file), "sections": 3}


def test_verify_corrupt(tmp_path, kvc_file):
    bad = tmp_path / "bad.kvc"
    data = bytearray(kvc_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    result = run("verify", bad, "--json")
    assert json.loads(result.stdout)["ok"] is False
    assert_one_line_error(result, "checksum")


def test_load_corrupt_file(tmp_path, kvc_file):
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(kvc_file.read_bytes()[:-100])
    assert_one_line_error(run("load", bad), "invalid .kvc file")


def test_load_wrong_model(tmp_path, kvc_file, tiny_tokenizer):
    from fixtures import tiny_model

    other = tmp_path / "other"
    lm = tiny_model("llama", tiny_tokenizer, seed=5)
    lm.model.save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    assert_one_line_error(run("load", kvc_file, "--model", other), "weight_digest")


# Exit 1: the files, the document or the model are at fault; exit 2: the command line itself
# (docs/cli.md, "Exit codes").
@pytest.mark.parametrize(
    "args,fragment,code",
    [
        (["compress", "{missing}", "-o", "{out}"], "does not exist", 1),
        (["compress", "{empty}", "-o", "{out}"], "is empty", 1),
        (["compress", "{binary}", "-o", "{out}"], "binary", 1),
        (["compress", "{doc}", "-o", "{out}", "--ratio", "0"], "out of range", 2),
        (["compress", "{doc}", "-o", "{out}", "--ratio", "0.001", "--json"], "attention sinks", 1),
        (["compress", "{doc}", "-o", "{out}", "--bits", "5"], "use 16 or 32", 2),
        (["compress", "{doc}", "-o", "{out}", "--bits", "16", "--codec", "ans"], "entropy-codes quantized", 2),
        (["compress", "{doc}", "-o", "{out}", "--key-bits", "7"], "--key-bits 7", 2),
        (["compress", "{doc}", "-o", "{out}", "--chunk-size", "0"], "--chunk-size 0", 2),
        (["compress", "{doc}", "-o", "{out}", "--group", "5"], "must divide", 1),
        (["compress", "{doc}", "-o", "{out}", "--model", "no-such-model"], "unknown model", 1),
        (["compress", "{doc}", "-o", "{out}", "--device", "gpu7"], "unknown device", 2),
        (["compress", "{doc}", "-o", "{tmp}/no/such/dir.kvc"], "does not exist", 1),
        (["load", "{missing}"], "does not exist", 1),
        (["load", "{doc}"], "bad magic", 1),
        (["inspect", "{doc}"], "bad magic", 1),
        (["verify", "{missing}"], "does not exist", 1),
    ],
)
def test_bad_input_gives_one_line(tmp_path, tiny_folder, short_doc, args, fragment, code):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(b"\x00\x01\x02" * 50)
    names = {"missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.bin",
             "doc": short_doc, "out": tmp_path / "o.kvc", "tmp": tmp_path}
    argv = [a.format(**names) for a in args]
    if argv[0] == "compress" and "--model" not in argv:
        argv += ["--model", str(tiny_folder)]
    assert_one_line_error(run(*argv), fragment, code)
    assert not (tmp_path / "o.kvc").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_usage_errors_exit_2(kvc_file):
    assert run("load", kvc_file, "--max-new-tokens", "0").exit_code == 2
    assert run("compress", "x.txt").exit_code == 2  # -o is required
    assert run("compress", "x.txt", "-o", "y.kvc", "--codec", "gzip").exit_code == 2
    assert run("compress", "x.txt", "-o", "y.kvc", "--scorer", "h2o").exit_code == 2
    assert run("compress", "x.txt", "-o", "y.kvc", "--allocation", "even").exit_code == 2
    assert run("load", kvc_file, "--decoder", "cuda").exit_code == 2


def test_load_refuses_a_decoder_it_cannot_run(kvc_file, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton's kernels then need a CUDA device
    assert_one_line_error(run("load", kvc_file, "--decoder", "triton", "--device", "cpu"),
                          "the triton decoder")


def test_load_reports_its_decoder(kvc_file, monkeypatch):
    from kvc_format import rans

    result = json.loads(run("load", kvc_file, "--json").stdout)
    assert result["decoder"] == "numpy" and result["rans_decoder"] == rans.decoder()
    monkeypatch.setenv("KVC_RANS_DECODER", "numpy")
    assert json.loads(run("load", kvc_file, "--json").stdout)["rans_decoder"] == "numpy"


def test_cli_choices_are_the_registries_and_help_imports_no_torch():
    """The options' choices are made from the registries (one source), which cost no torch import: --help and the
    cheap checks start fast."""
    from kvzip_cli.cli.compress import AllocationName, ScorerName
    from kvzip_cli.prune import ALLOCATIONS
    from kvzip_cli.prune.scorers import SCORERS

    assert [s.value for s in ScorerName] == list(SCORERS)
    assert tuple(a.value for a in AllocationName) == ALLOCATIONS
    probe = "import sys, kvzip_cli.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == (
        "False False\n")


def test_version_and_help():
    from kvzip_cli import __version__

    assert run("version").stdout == f"kvc {__version__}\n"
    flag = run("--version")
    assert flag.exit_code == 0 and flag.stdout == f"kvc {__version__}\n"
    helptext = run("compress", "--help").stdout
    assert "--ratio" in helptext and "--codec" in helptext and "stdin" in helptext


SLOW_WRITER = textwrap.dedent(
    """
    import signal, sys, time
    from kvc_format import writer
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored
    original = writer.KvcWriter.add_section
    def slow(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        print("section written", file=sys.stderr, flush=True)
        time.sleep(60)
        return result
    writer.KvcWriter.add_section = slow
    from kvzip_cli.cli import main
    sys.argv = ["kvc"] + sys.argv[1:]
    main()
    """
)


def _open_in(pid: int, folder: Path) -> list[str]:
    """The files under `folder` that process `pid` holds open (an unnamed O_TMPFILE shows as `folder/#N (deleted)`)."""
    targets = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    return [t for t in targets if t.startswith(f"{folder}/")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signal_during_write_leaves_nothing(tmp_path, tiny_folder, short_doc, sig):
    """A compress stopped in the middle of writing its file (Ctrl-C, kill, kill -9) leaves no file behind."""
    out = tmp_path / "doc.kvc"
    probe = AtomicFile(out)
    probe.discard()
    if not probe.unnamed:
        pytest.skip("no O_TMPFILE on this system: the hidden .partial file being written is visible")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, "compress", str(short_doc), "-o", str(out), "--model", str(tiny_folder),
         "--json", "--no-estimate"],  # the file written is the output itself (the estimate's case: below)
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stderr:
        if "section written" in line:
            break
    assert len(_open_in(proc.pid, tmp_path)) == 1  # the file being written, not yet visible under any name
    assert list(tmp_path.iterdir()) == []
    proc.send_signal(sig)
    rest = proc.stderr.read()
    if sig == signal.SIGKILL:
        assert proc.wait(timeout=60) == -signal.SIGKILL
    else:
        assert proc.wait(timeout=60) == 130
        assert "error: interrupted" in rest
    assert list(tmp_path.iterdir()) == []


SLOW_ESTIMATE = textwrap.dedent(
    """
    import signal, sys, time
    from kvzip_cli.compress import pipeline
    signal.signal(signal.SIGINT, signal.default_int_handler)
    def slow(pre, path):
        print("estimating", path, file=sys.stderr, flush=True)
        time.sleep(60)
    pipeline.estimate_loss = slow
    from kvzip_cli.cli import main
    sys.argv = ["kvc"] + sys.argv[1:]
    main()
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_the_estimate_leaves_nothing(tmp_path, tiny_folder, short_doc, sig):
    """The file measured for its estimate lies in the system's temporary folder, removed when kvc is stopped; the
    output's folder never sees it."""
    out = tmp_path / "doc.kvc"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_ESTIMATE, "compress", str(short_doc), "-o", str(out), "--model", str(tiny_folder),
         "--json"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stderr:
        if line.startswith("estimating"):
            measured = Path(line.split(" ", 1)[1].strip())
            break
    assert measured.is_file() and not measured.is_relative_to(tmp_path) and list(tmp_path.iterdir()) == []
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130 and "error: interrupted" in rest
    assert list(tmp_path.iterdir()) == [] and not measured.parent.exists()


def test_closed_stdout_stops_quietly(kvc_file):
    """`kvc inspect f.kvc | head -1`: the reader goes away; kvc stops without an error message or traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "kvzip_cli", "inspect", str(kvc_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before kvc writes anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert stderr == ""


@pytest.mark.parametrize("flags,recorded", [(["--refit"], "values+bias"), (["--no-logit-bias"], "values"),
                                            (["--no-refit"], None),
                                            (["--allocation", "position"], "values"),
                                            (["--allocation", "position", "--logit-bias"], "values+bias"),
                                            (["--preset", "small"], "values"),
                                            (["--preset", "small", "--logit-bias"], "values+bias")])
def test_compress_refit_flags(tmp_path, tiny_folder, short_doc, flags, recorded):
    out = tmp_path / "r.kvc"
    made = run("compress", short_doc, "-o", out, "--model", tiny_folder, "--ratio", "0.4", *flags, "--json")
    assert made.exit_code == 0, made.output
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["settings"]["refit"] == recorded
    assert ("bias" in info["streams"]) == (recorded == "values+bias")
    overridden = "--logit-bias" in flags and "--allocation" not in flags  # a change to the preset's own choice
    assert ("--logit-bias" in info["settings"]["overrides"]) == overridden


@pytest.mark.parametrize("flags,message", [(["--no-refit", "--logit-bias"], "drop --no-refit"),
                                           (["--target-top1", "0.9", "--no-logit-bias"], "is not refit")])
def test_logit_bias_needs_the_refit(tmp_path, tiny_folder, short_doc, flags, message):
    result = run("compress", short_doc, "-o", tmp_path / "r.kvc", "--model", tiny_folder, *flags)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
