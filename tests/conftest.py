"""Shared pytest fixtures: tiny random-weight Qwen2 / Llama models (tests/fixtures.py builds them), a saved tiny
model folder for the CLI, a short document.

These are for fast unit tests of the mechanics only; claims about quality use the real models.
"""

import os

# Triton's kernels (kvzip_cli.load.kernels) run on the CPU under its interpreter in tests. Triton reads this when it is
# first imported, which torch or transformers may do before any test module.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest
from transformers import PreTrainedTokenizerFast

from kvzip_cli import LoadedModel

from fixtures import DOCS, tiny_model, train_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer()


@pytest.fixture(params=["qwen2", "llama"])
def tiny(request, tiny_tokenizer) -> LoadedModel:
    return tiny_model(request.param, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama saved as a model folder, for driving the CLI with --model <folder>."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", tiny_tokenizer)
    lm.model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def short_doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "short.txt"
    path.write_text(DOCS.joinpath("apache-2.0.txt").read_text()[:3000])
    return path
