"""The README's Python API block runs as written, prints its answers, and is examples/python_api.py."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE = ROOT / "examples" / "python_api.py"


def readme_python_block() -> str:
    """The first ```python block under the README's "## Python API" heading."""
    section = re.search(r"^## Python API\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert section, 'README.md has no "## Python API" section'
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the README's Python API section has no ```python block"
    return block.group(1)


def example_without_docstring() -> str:
    source = EXAMPLE.read_text(encoding="utf-8")
    docstring = ast.parse(source).body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    return "\n".join(source.splitlines()[docstring.end_lineno:]).strip() + "\n"


def test_the_readme_block_is_the_example_program():
    assert readme_python_block().strip() + "\n" == example_without_docstring()


@pytest.mark.slow
def test_the_readme_python_block_prints_an_answer(tmp_path):
    """Run from a folder that holds what the block reads (its document), as a user at the repository root would;
    the block writes its .kvc there."""
    block = readme_python_block()
    for doc in re.findall(r'"(examples/docs/[^"]+)"', block):
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tmp_path / doc)
    (tmp_path / "readme_block.py").write_text(block, encoding="utf-8")
    run = subprocess.run([sys.executable, "readme_block.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    answers = [line.removeprefix("A:").strip() for line in run.stdout.splitlines() if line.startswith("A:")]
    assert len(answers) == 2 and all(answers), run.stdout
    assert "smaller than the fp16 cache" in run.stdout
    assert any(tmp_path.glob("*.kvc"))
