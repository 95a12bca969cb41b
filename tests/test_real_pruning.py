"""Pruning on the embedded SmolLM2-135M-Instruct: scores find what matters, and a pruned cache still answers."""

import pytest
import torch

from kvzip_cli import load_model
from kvzip_cli.bench.runner import run_bench
from kvzip_cli.bench.sweep import Setting
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.evaluation.probes import plant_needles
from kvzip_cli.prune.scoring import score_context

from fixtures import DOCS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def needles_scored(smol):
    text, needles = plant_needles(DOCS.joinpath("apache-2.0.txt").read_text()[:6000])
    pre = prefill_document(text, smol)
    return pre, needles, score_context(smol, pre.cache, pre.layout, "kvzip")


def _positions_of(ids: list[int], pattern: list[int]) -> list[int]:
    for start in range(len(ids) - len(pattern) + 1):
        if ids[start : start + len(pattern)] == pattern:
            return list(range(start, start + len(pattern)))
    raise AssertionError("pattern not found")


def test_kvzip_keeps_planted_needles(smol, needles_scored):
    """The digits of each planted key are kept more often than the document's average entry. On this 135M model the
    margin is modest (measured at 20% kept: 1.2-1.7x the average rate; the full cache itself recalls 1 key of 3)."""
    pre, needles, scored = needles_scored
    keep = scored.keep(0.2).keep
    average = keep[:, :, pre.layout.document_start : pre.layout.document_end].float().mean()
    rates = []
    for probe in needles:
        digits = smol.tokenizer(f" is {probe.expect}.", add_special_tokens=False).input_ids[1:-1]
        rates.append(keep[:, :, _positions_of(pre.layout.prefix_ids, digits)].float().mean() / average)
    assert min(rates) > 1.05, rates
    assert sum(rates) / len(rates) > 1.2, rates


def test_kvzip_global_budget_is_uneven_across_layers(needles_scored):
    per_layer = needles_scored[2].keep(0.3).keep.float().mean(dim=(1, 2))
    assert per_layer.max() - per_layer.min() > 0.2


def test_kvzip_beats_random_and_streaming_at_the_same_ratio(smol):
    """Top-1 is compared over 32 answer tokens per prompt: over 8 it moved by one token in 56 between tokenizer
    versions (kvzip 0.964, random 0.982) while kvzip's kld stayed 17x lower. Measured with 32: kld 0.0031 / 0.095 /
    0.204 and top1 0.941 / 0.849 / 0.712 for kvzip / random / streaming."""
    text = DOCS.joinpath("gpl-2.txt").read_text()[:5000]
    sweep = [Setting(f"kvc {s} 0.3", s, "kvc", 0.3, 16, "zstd", scorer=s) for s in ("kvzip", "random", "streaming")]
    rows = {r["family"]: r for r in run_bench(text, "gpl-2 excerpt", smol, sweep, [], new_tokens=32).rows}
    assert rows["kvzip"]["kld"] < 0.5 * min(rows["random"]["kld"], rows["streaming"]["kld"])
    assert rows["kvzip"]["top1"] > max(rows["random"]["top1"], rows["streaming"]["top1"])
    assert rows["kvzip"]["top1"] >= 0.9
    for row in rows.values():
        assert row["memory_ratio"] == pytest.approx(0.3, abs=0.01)


def test_kvzip_scoring_leaves_the_cache_unchanged(smol):
    pre = prefill_document(DOCS.joinpath("mpl-2.0.txt").read_text()[:3000], smol)
    before = [layer.keys.clone() for layer in pre.cache.layers]
    score_context(smol, pre.cache, pre.layout, "kvzip")
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, pre.cache.layers, strict=True))
