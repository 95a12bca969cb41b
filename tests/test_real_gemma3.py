"""End to end on Gemma 3 270M (`--model gemma3`, the second real model: 1 KV head of 256, five sliding-window layers
of window 512 for every global one, a base model laid out plainly): a lossless file stores only what the model's own
cache holds and answers exactly as the model does without a cache; a `balanced` file answers a needle the full cache
answers. Tokens equal to llama.cpp's: tests/test_real_tokenizer.py."""

import json
import subprocess
import sys

import pytest
import torch

from kvc_format import KvcReader
from kvzip_cli import compress_text, load, load_model
from kvzip_cli.load.answer import ask

from fixtures import DOCS, cached, uncached

pytestmark = pytest.mark.slow
WINDOW, SLIDING, GLOBAL = 512, 15, 3  # Gemma 3 270M: layers 5, 11 and 17 are global
EXCERPT = DOCS.joinpath("apache-2.0.txt").read_text()[:10_000]  # about 2,000 tokens: four windows long
NEEDLE = "The vault's access code is 7391-ALPHA."
QUESTIONS = ["Who is the licensor?", "What does this license say about patents?"]


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3", device="cpu")


def own_cache_bytes(tokens: int) -> int:
    """What transformers' own cache of `tokens` holds in float16: the global layers every token, the sliding ones
    the last window − 1."""
    return 2 * (GLOBAL * tokens + SLIDING * (WINDOW - 1)) * 256 * 2


def test_a_lossless_file_is_transformers_own_windowed_cache_exactly(tmp_path, gemma):
    """--bits 32: the sliding layers store their last 511 positions only, the global ones every position; the loaded
    cache gives the uncached model's greedy tokens (32 of them, so the window moves on past the document) and its
    logits to float rounding."""
    path = tmp_path / "g.kvc"
    result = compress_text(EXCERPT, path, model=gemma, preset="lossless", bits=32, estimate=False)
    assert 1_800 < result.tokens < 2_500
    assert result.raw_bytes == own_cache_bytes(result.tokens) and result.kept_ratio == 1.0
    with KvcReader(path) as reader:
        g = reader.geometry
        assert g.windows.count(WINDOW) == SLIDING and g.windows.count(None) == GLOBAL
        assert [g.held(i) for i in range(g.layers)] == [result.tokens if w is None else WINDOW - 1 for w in g.windows]
    kv = load(path, gemma)
    assert [layer.keys.shape[-2] for layer in kv.cache.layers] == [g.held(i) for i in range(g.layers)]
    for question in QUESTIONS:
        ids = kv.prompt_ids(gemma.tokenizer, question)
        want_tokens, want_logits = uncached(gemma, ids, 32)
        got_tokens, got_logits = cached(gemma, kv, ids, 32)
        assert got_tokens == want_tokens, question
        torch.testing.assert_close(got_logits, want_logits, atol=1e-3, rtol=0)


def test_a_balanced_file_answers_a_needle_the_full_cache_answers(tmp_path, gemma):
    paragraphs = EXCERPT.split("\n\n")
    paragraphs.insert(len(paragraphs) // 2, NEEDLE)
    text = "\n\n".join(paragraphs)
    question = "What is the vault's access code?"
    full = compress_text(text, tmp_path / "full.kvc", model=gemma, preset="lossless", estimate=False)
    balanced = compress_text(text, tmp_path / "b.kvc", model=gemma)  # the default preset
    for made in (full, balanced):
        answer = ask(gemma.model, gemma.tokenizer, load(made.output, gemma), question, 12)
        assert "7391-ALPHA" in answer.text, (made.output, answer.text)
    assert balanced.kept_ratio == pytest.approx(0.25, abs=0.002)  # of what the model's own cache holds
    assert balanced.compression > 15  # measured 20.6x on apache-2.0 alone
    # the file's own loss estimate, made on Gemma 3's windowed cache
    assert balanced.estimate["probes"] >= 8 and 0 < balanced.estimate["top1"] <= 1 and balanced.estimate["kld"] >= 0


def test_inspect_states_the_windows_and_the_models_own_cache(tmp_path, gemma):
    path = tmp_path / "g.kvc"
    result = compress_text(EXCERPT, path, model=gemma, preset="lossless", estimate=False)
    kvc = [sys.executable, "-m", "kvzip_cli", "inspect", str(path)]
    info = json.loads(subprocess.run([*kvc, "--json"], capture_output=True, text=True, check=True).stdout)
    assert info["raw_bytes"] == own_cache_bytes(result.tokens) == result.raw_bytes and info["kept_ratio"] == 1.0
    assert [layer["window"] for layer in info["layers"]].count(WINDOW) == SLIDING
    text = subprocess.run(kvc, capture_output=True, text=True, check=True).stdout
    assert "15 of 18 layers slide (window 512): each stores only the 511 positions a later token sees" in text
