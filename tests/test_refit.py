"""Refitting the kept values after pruning (kvzip_cli.prune.refit): the least-squares fit, the recorded reference
queries, and the values a pruned file stores with and without it, on random tensors and tiny random-weight models."""

import math
from dataclasses import replace

import pytest
import torch

from kvc_format import KvcReader
from kvzip_cli import compress_text, load
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.context import layer_windows
from kvzip_cli.prune.refit import BIAS_RANGE, MAX_QUERIES, ReferenceQueries, Refit, output_error, refit_values
from kvzip_cli.prune.scoring import score_context

from family_models import family_model
from fixtures import TEXT


def _random_head(seed: int, kv_heads: int = 2, group: int = 3, tokens: int = 96, dim: int = 16, queries: int = 80):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(kv_heads, tokens, dim, generator=g) * 2
    values = torch.randn(kv_heads, tokens, dim, generator=g)
    q = torch.randn(kv_heads * group, queries, dim, generator=g) * 2
    keep = torch.rand(kv_heads, tokens, generator=g) < 0.3
    keep[:, 0] = True
    return keys, values, keep, q


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("seed", range(3))
def test_refit_lowers_the_error_it_minimises_and_leaves_dropped_rows(seed, softcap):
    keys, values, keep, q = _random_head(seed)
    scaling = keys.shape[-1] ** -0.5
    fitted = refit_values(keys, values, keep, q, scaling, softcap)
    before = output_error(keys, values, keep, q, scaling, softcap=softcap)
    after = output_error(keys, values, keep, q, scaling, fitted, softcap=softcap)
    assert after < 0.75 * before  # the fit is at most the error at V' = V; random data leaves much of it
    assert torch.equal(fitted.values[~keep], values[~keep]) and fitted.bias is None
    # Without the ridge term's pull towards the old values the fit can only get closer.
    loose = refit_values(keys, values, keep, q, scaling, softcap, ridge=1e-9)
    assert output_error(keys, values, keep, q, scaling, loose, softcap=softcap) <= after * (1 + 1e-4)


def test_refit_of_the_whole_context_keeps_the_values():
    keys, values, _, q = _random_head(0)
    keep = torch.ones(keys.shape[:2], dtype=torch.bool)
    fitted = refit_values(keys, values, keep, q, keys.shape[-1] ** -0.5, logit_bias=True)
    torch.testing.assert_close(fitted.values, values, atol=1e-3, rtol=1e-3)
    # Every key kept: the kept keys already carry all of each query's mass, so w = 1 fits exactly.
    torch.testing.assert_close(torch.stack(fitted.bias), torch.zeros(keep.shape), atol=1e-4, rtol=0)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("seed", range(3))
def test_a_logit_bias_lowers_the_error_further_and_stays_in_range(seed, softcap):
    keys, values, keep, q = _random_head(seed)
    scaling = keys.shape[-1] ** -0.5
    plain = refit_values(keys, values, keep, q, scaling, softcap)
    biased = refit_values(keys, values, keep, q, scaling, softcap, logit_bias=True)
    assert [len(b) for b in biased.bias] == keep.sum(1).tolist()
    assert max(float(b.abs().max()) for b in biased.bias) <= math.log(BIAS_RANGE) + 1e-5
    assert min(float(b.max()) for b in biased.bias) > 0  # a pruned context lost mass: some keys must weigh more
    assert torch.equal(biased.values[~keep], values[~keep])
    # What the bias fits: each query's mass on the kept keys, weighted by exp(β), against its full-context mass (1).
    group = q.shape[0] // keys.shape[0]
    for h in range(keys.shape[0]):
        logits = q[h * group : (h + 1) * group].reshape(-1, keys.shape[-1]) @ keys[h].T * scaling
        logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
        share = torch.softmax(logits, -1)[:, keep[h]]
        unbiased = (share.sum(1) - 1).norm()
        assert (share @ biased.bias[h].exp() - 1).norm() < 0.9 * unbiased  # random keys: far from all of it
    # The values are then fit under the biased weights: better than the biased weights with the plain refit's values.
    as_plain = Refit(plain.values, biased.bias)
    assert output_error(keys, values, keep, q, scaling, biased, softcap=softcap) < output_error(
        keys, values, keep, q, scaling, as_plain, softcap=softcap)


def test_reference_queries_keep_every_stride_th_position_across_calls():
    recorder = ReferenceQueries(stride=3)
    positions = torch.arange(10, dtype=torch.float32)
    for piece in (positions[:4], positions[4:5], positions[5:]):  # three forward passes of one layer
        query = piece.view(1, 1, -1, 1).expand(1, 2, -1, 4)
        recorder.at = 100 + int(piece[0])  # where the pass's forward starts
        recorder(0, query, None, None, 0.25)
    got = recorder.layer(0)
    assert got.shape == (2, 4, 4)
    assert got[0, :, 0].tolist() == [0.0, 3.0, 6.0, 9.0]
    assert recorder.positions(0).tolist() == [100, 103, 106, 109]
    assert recorder.scaling[0] == 0.25 and recorder.layer(1) is None
    assert ReferenceQueries.for_positions(3 * MAX_QUERIES + 1).stride == 4


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return prefill_document(TEXT, family_model("llama3", tiny_tokenizer), chunk_size=128)


@pytest.mark.parametrize("scorer", ["kvzip", "knorm"])
def test_scoring_records_reference_queries_for_every_layer(llama, scorer):
    scored = score_context(llama.lm, llama.cache, llama.layout, scorer)
    config = llama.lm.model.config
    for i in range(config.num_hidden_layers):
        queries = scored.queries.layer(i)
        assert queries.shape[0] == config.num_attention_heads and queries.shape[1] > len(llama.layout.prefix_ids) / 2
    assert score_context(llama.lm, llama.cache, llama.layout, scorer, refit=False).queries is None


def _kept_rows(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(kv_heads, tokens, head_dim) → the kept rows, heads concatenated (a file's row order)."""
    return torch.cat([tensor[h, keep[h]] for h in range(len(keep))])


def _stored_values(path, lm) -> list[torch.Tensor]:
    """Each layer's kept values as loaded, heads concatenated."""
    return [torch.cat(layer.context_values, dim=1)[0] for layer in load(path, lm).cache.layers]


def test_a_pruned_file_stores_the_refit_values(tmp_path, llama):
    pre = llama
    pruning = score_context(pre.lm, pre.cache, pre.layout, "kvzip").keep(0.4)
    write_kvc(pre, tmp_path / "biased.kvc", bits=32, pruning=pruning)
    write_kvc(pre, tmp_path / "refit.kvc", bits=32, pruning=replace(pruning, logit_bias=False))
    write_kvc(pre, tmp_path / "plain.kvc", bits=32, pruning=replace(pruning, queries=None))
    readers = {name: KvcReader(tmp_path / f"{name}.kvc") for name in ("biased", "refit", "plain")}
    assert [r.header["settings"]["refit"] for r in readers.values()] == ["values+bias", "values", None]
    assert [bool(r.bias_layers) for r in readers.values()] == [True, False, False]
    stored = {name: _stored_values(tmp_path / f"{name}.kvc", pre.lm) for name in readers}
    lowered = 0
    for i, layer in enumerate(pre.cache.layers):
        keys, values, keep = layer.keys[0], layer.values[0], pruning.keep[i]
        queries, scaling = pruning.queries.layer(i), pruning.queries.scaling[i]
        expected = refit_values(keys, values, keep, queries, scaling)
        biased = refit_values(keys, values, keep, queries, scaling, logit_bias=True)
        torch.testing.assert_close(stored["refit"][i], _kept_rows(expected.values, keep))
        assert torch.equal(stored["plain"][i], _kept_rows(values, keep))
        torch.testing.assert_close(stored["biased"][i], _kept_rows(biased.values, keep))
        torch.testing.assert_close(torch.from_numpy(readers["biased"].read_bias(i)),
                                   torch.cat(biased.bias).half().float())
        assert readers["refit"].read_bias(i) is None
        before = output_error(keys, values, keep, queries, scaling)
        lowered += output_error(keys, values, keep, queries, scaling, expected) < before
    assert lowered == len(pre.cache.layers)


def test_a_biased_file_loads_with_its_bias(tmp_path, llama):
    pruning = score_context(llama.lm, llama.cache, llama.layout, "kvzip").keep(0.4)
    write_kvc(llama, tmp_path / "b.kvc", bits=16, pruning=pruning)
    reader = KvcReader(tmp_path / "b.kvc")
    for i, layer in enumerate(load(tmp_path / "b.kvc", llama.lm).cache.layers):
        assert [len(b) for b in layer.context_bias] == layer.kept
        torch.testing.assert_close(torch.cat(layer.context_bias).float(), torch.from_numpy(reader.read_bias(i)))


def test_a_window_wider_than_the_context_changes_nothing():
    keys, values, keep, q = _random_head(1)
    scaling = keys.shape[-1] ** -0.5
    plain = refit_values(keys, values, keep, q, scaling, logit_bias=True)
    at = torch.arange(keys.shape[1], keys.shape[1] + q.shape[1])  # queries after the context, as the passes'
    wide = refit_values(keys, values, keep, q, scaling, logit_bias=True, window=(at, 10 * keys.shape[1]))
    torch.testing.assert_close(wide.values, plain.values)
    torch.testing.assert_close(torch.cat(wide.bias), torch.cat(plain.bias))


def test_a_sliding_window_layer_is_fit_to_what_each_query_sees():
    """Queries after the context, window 24: each sees only the context's last entries (the later ones fewer, the
    last ones none); the windowed fit lowers the windowed error, leaves entries no query sees, and the fit without the
    window (every query seeing every entry) does not do as well."""
    keys, values, keep, q = _random_head(2, tokens=64, queries=40)
    scaling = keys.shape[-1] ** -0.5
    window = (torch.arange(64, 104), 24)
    fitted = refit_values(keys, values, keep, q, scaling, logit_bias=True, window=window)
    blind = refit_values(keys, values, keep, q, scaling, logit_bias=True)
    before = output_error(keys, values, keep, q, scaling, window=window)
    after = output_error(keys, values, keep, q, scaling, fitted, window=window)
    assert after < 0.75 * before and after < output_error(keys, values, keep, q, scaling, blind, window=window)
    unseen = torch.arange(64) <= 64 - 24  # no query (at 64 or later) sees these
    assert torch.equal(fitted.values[:, unseen], values[:, unseen])


def test_sliding_window_layers_are_refit_within_their_window(tmp_path, tiny_tokenizer):
    """Mistral's window (24 positions) is far shorter than the document: the prefill and the file hold only each
    layer's window, refit to the reference queries that see it, and its windowed error drops."""
    pre = prefill_document(TEXT, family_model("mistral", tiny_tokenizer), chunk_size=128)
    pruning = score_context(pre.lm, pre.cache, pre.layout, "kvzip").keep(0.5)
    write_kvc(pre, tmp_path / "m.kvc", bits=32, pruning=pruning)
    reader = KvcReader(tmp_path / "m.kvc")
    assert reader.header["settings"]["refit"] == "values+bias"
    windows = layer_windows(pre.lm.model.config)
    for (i, stored_layer), window in zip(reader.iter_layers(), windows, strict=True):
        first = reader.geometry.first_position(i)
        assert window is not None and first == pre.tokens - (window - 1)
        assert all(len(p) and p.min() >= first for p in stored_layer.positions)
        keys, values = pre.cache.layers[i].keys[0], pre.cache.layers[i].values[0]  # the prefill holds the window
        keep = pruning.keep[i][:, first:]
        queries = pruning.queries.layer(i)
        seen = (pruning.queries.positions(i) - first, window)
        stored = torch.from_numpy(stored_layer.values.data.astype("float32"))
        expected = refit_values(keys, values, keep, queries, pruning.queries.scaling[i], logit_bias=True, window=seen)
        torch.testing.assert_close(stored, torch.cat([expected.values[h, keep[h]] for h in range(len(keep))]))
        torch.testing.assert_close(torch.from_numpy(reader.read_bias(i)), torch.cat(expected.bias), atol=1e-3,
                                   rtol=0)
        scaling = pruning.queries.scaling[i]
        assert output_error(keys, values, keep, queries, scaling, expected, window=seen) < output_error(
            keys, values, keep, queries, scaling, window=seen)


def test_compress_without_refit(tmp_path, tiny_tokenizer):
    lm = family_model("llama3", tiny_tokenizer)
    compress_text(TEXT, tmp_path / "n.kvc", model=lm, preset="balanced", refit=False)
    compress_text(TEXT, tmp_path / "r.kvc", model=lm, preset="balanced")
    assert KvcReader(tmp_path / "n.kvc").header["settings"]["refit"] is None
    assert KvcReader(tmp_path / "r.kvc").header["settings"]["refit"] == "values+bias"
