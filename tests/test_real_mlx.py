"""MLX-LM answers from caches that kvc made and `kvc_format.export_mlx` converted as from its own prefill of the same
tokens: the real runtime (mlx 0.32.4, mlx-lm 0.32.2, on the CPU) in its own venv, since mlx-lm needs a newer
transformers than kvc's, running studies/edge/edge_mlx.py on the embedded model's converted folder. The MLX venv's
python is $KVC_MLX_PYTHON (default .venv-mlx/bin/python); CI creates it, and there these tests never skip."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from kvzip_cli import load_model
from kvzip_cli.compress.pipeline import compress_text
from kvzip_cli.models.files import embedded_gguf
from kvzip_cli.models.loading import converted_folder

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
MLX_PYTHON = Path(os.environ.get("KVC_MLX_PYTHON", REPO / ".venv-mlx" / "bin" / "python"))
QUESTION = "Who is the licensor?"
# A few hundred tokens (323) keep MLX's CPU prefill, on the mlx-cpu wheel's reference BLAS, to 1-2 minutes on 2 cores.
TEXT = (REPO / "examples" / "docs" / "apache-2.0.txt").read_text()[:1500]
SETTINGS = {
    "lossless": {"preset": "lossless"},
    "4-bit": {"ratio": 1.0, "bits": 4, "codec": "ans"},
    "pruned": {"ratio": 0.5, "scorer": "knorm", "bits": 16, "codec": "zstd"},
}


@pytest.fixture(scope="module")
def mlx_python() -> Path:
    if not MLX_PYTHON.is_file():
        message = f"MLX-LM's python {MLX_PYTHON} is missing: create .venv-mlx as .ci/run does, or set KVC_MLX_PYTHON"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return MLX_PYTHON


@pytest.fixture(scope="module")
def files(tmp_path_factory, mlx_python) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mlx")
    lm = load_model("smollm2", device="cpu")
    for name, options in SETTINGS.items():
        compress_text(TEXT, folder / f"{name}.kvc", model=lm, estimate=False, **options)  # the runtime is tested
    # the working tree's kvc_format, whichever one the MLX venv has installed
    (folder / "path").mkdir()
    (folder / "path" / "kvc_format").symlink_to(REPO / "format")
    return {name: folder / f"{name}.kvc" for name in SETTINGS} | {"path": folder / "path"}


def edge_mlx(mlx_python: Path, files: dict, *names: str) -> subprocess.CompletedProcess:
    model = converted_folder(embedded_gguf())
    command = [str(mlx_python), str(REPO / "studies" / "edge" / "edge_mlx.py"), "--model", str(model),
               "--question", QUESTION, *(str(files[name]) for name in names)]
    env = {**os.environ, "PYTHONPATH": str(files["path"])}
    return subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)


def test_mlx_answers_from_the_exported_caches_as_from_its_own_prefill(mlx_python, files):
    done = edge_mlx(mlx_python, files, "lossless", "4-bit")
    assert done.returncode == 0, done.stderr
    rows = {Path(row["file"]).stem: row for row in json.loads(done.stdout)["rows"]}
    seen = {name: {k: row[k] for k in ("agreement", "exact", "top1", "cache_answer", "prefill_answer")}
            for name, row in rows.items()}
    assert rows["lossless"]["question_tokens"] == rows["4-bit"]["question_tokens"] > 5
    # The lossless file holds transformers' float32 prefill in float16, MLX's own cache its float32 prefill: measured
    # the same 32 tokens and top1 1.0 here and on all 12 questions of the six example documents
    # (studies/edge/results/edge-mlx.md).
    assert rows["lossless"]["exact"] and rows["lossless"]["top1"] == 1.0, seen
    # 4-bit keys and values: measured top1 0.97 and 31 of 32 tokens in common here; on the example documents top1
    # 0.94-1.0, and greedy answers that part at a near-tie after 7 to 32 tokens (4 of 12 equal).
    assert rows["4-bit"]["top1"] >= 0.9 and rows["4-bit"]["agreement"] >= 0.2, seen


def test_a_pruned_file_is_refused(mlx_python, files):
    done = edge_mlx(mlx_python, files, "pruned")
    assert done.returncode != 0
    assert "ExportError" in done.stderr and "MLX-LM's cache has no gaps" in done.stderr
