"""Scorers, budgets, the pruned cache and its attention, on tiny random-weight models (mechanics, not quality)."""

from dataclasses import replace

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvzip_cli import compress_text, load
from kvzip_cli.attention import kvc_attention_in
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.errors import KvcError
from kvzip_cli.load.pruned_cache import PrunedCache
from kvzip_cli.prune.budget import ALLOCATIONS, SINK_TOKENS, allocate, protected_positions
from kvzip_cli.prune.scorers import SCORERS, ScoringInputs
from kvzip_cli.prune.scorers.compactor import leverage
from kvzip_cli.prune.scorers.kvzip import KVzipScorer, max_received
from kvzip_cli.prune.scoring import Pruning, score_context
from kvzip_cli.rope import unrotate

from fixtures import TEXT

QUESTION = "Who may use the work?"


@pytest.fixture(scope="module")
def prefilled(tiny_tokenizer):
    from fixtures import tiny_model

    lm = tiny_model("llama", tiny_tokenizer, initializer_range=0.2)
    return prefill_document(TEXT, lm, chunk_size=128)


@pytest.fixture(scope="module")
def scored(prefilled):
    pre = prefilled
    return {name: score_context(pre.lm, pre.cache, pre.layout, name) for name in SCORERS}


def test_document_span_excludes_the_template(prefilled):
    layout, tok = prefilled.layout, prefilled.lm.tokenizer
    assert 0 < layout.document_start < layout.document_end <= len(layout.prefix_ids)
    document = tok.decode(layout.prefix_ids[layout.document_start : layout.document_end])
    assert TEXT.strip().startswith(document.strip()[:200])
    assert "<|im_start|>" in tok.decode(layout.prefix_ids[: layout.document_start])


@pytest.mark.parametrize("name", list(SCORERS))
def test_every_scorer_rates_every_entry(prefilled, scored, name):
    s = scored[name].scores
    layers, heads = len(prefilled.cache.layers), prefilled.cache.layers[0].keys.shape[1]
    assert s.shape == (layers, heads, prefilled.tokens) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and s.std() > 0
    assert prefilled.cache.get_seq_length() == prefilled.tokens  # scoring left the cache as it was


@pytest.mark.parametrize("name", [n for n in SCORERS if n != "random"])
def test_scores_are_computed_not_random(scored, name):
    """A scorer that silently stopped scoring (as kvpress's KVzip once did) would keep what random keeps."""
    keep = scored[name].keep(0.3, "head").keep
    baseline = scored["random"].keep(0.3, "head").keep
    overlap = (keep & baseline).sum() / keep.sum()
    assert overlap < 0.6  # independent choices would overlap ≈ 0.3 + the protected tokens


def test_kvzip_scores_are_max_attention_weights(scored):
    s = scored["kvzip"].scores
    assert s.min() >= 0 and s.max() <= 1


def test_kvzip_passes_cover_the_document_within_the_position_limit(prefilled, monkeypatch):
    pre = prefilled
    config = pre.lm.model.config
    monkeypatch.setattr(config, "max_position_embeddings", pre.tokens + 300)
    passes = KVzipScorer()._passes(ScoringInputs(pre.lm.model, pre.lm.tokenizer, pre.cache, pre.layout))
    assert len(passes) > 1
    assert all(pre.tokens + len(ids) <= config.max_position_embeddings for _, _, ids in passes)
    covered = [i for first, last, _ in passes for i in range(first, last)]
    assert covered == list(range(pre.layout.document_start, pre.layout.document_end))
    assert all(ids[-(last - first) :] == pre.layout.prefix_ids[first:last] for first, last, ids in passes)


def test_kvzip_scores_do_not_depend_on_how_a_pass_is_split(prefilled):
    pre = prefilled
    inputs = ScoringInputs(pre.lm.model, pre.lm.tokenizer, pre.cache, pre.layout)
    whole = KVzipScorer(chunk_tokens=400, forward_tokens=10**6).score(inputs)
    pieces = KVzipScorer(chunk_tokens=400, forward_tokens=97).score(inputs)
    assert torch.allclose(whole, pieces, atol=1e-2)
    assert (whole[..., pre.layout.document_start : pre.layout.document_end] > 0).all()


def test_max_received_matches_a_direct_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 50, 8)
    best = max_received(q, k, 0.3, block=7, dtype=torch.float32)
    allowed = torch.ones(20, 50, dtype=torch.bool).tril(30)  # the 20 queries are the last 20 keys
    weights = torch.softmax((q.view(2, 2, 20, 8) @ k[0, :, None].transpose(-1, -2)) * 0.3
                            + torch.where(allowed, 0.0, float("-inf")), dim=-1)
    assert torch.allclose(best, weights.amax(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(max_received(q, k, 0.3), best, atol=1e-2)  # bfloat16 by default


def test_unrotate_inverts_rope(prefilled):
    model = prefilled.lm.model
    x = torch.randn(1, 2, 40, 16)
    cos, sin = model.model.rotary_emb(x, torch.arange(40)[None])
    _, rotated = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(unrotate(rotated, cos, sin), x, atol=1e-5)


def test_leverage_sums_to_rank():
    x = torch.randn(200, 6, dtype=torch.float64)
    lev = leverage(x, ridge=1e-10)
    assert lev.sum().item() == pytest.approx(6, rel=1e-6) and (lev > 0).all() and (lev < 1).all()
    outlier = torch.cat([x, 50 * torch.ones(1, 6, dtype=torch.float64)])
    assert leverage(outlier, ridge=1e-10).argmax() == 200


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.1])
def test_budgets_are_exact_and_keep_the_template(scored, allocation, ratio):
    s = scored["kvzip"]
    keep = allocate(s.scores, ratio, allocation, s.protected)
    layers, heads, tokens = keep.shape
    # position keeps whole positions: round(ratio × tokens) of them, in every (layer, head)
    kept = round(ratio * tokens) * layers * heads if allocation == "position" else round(ratio * keep.numel())
    assert keep.sum() == kept
    assert keep[..., s.protected].all()  # template and sinks, in every head
    assert keep[..., :SINK_TOKENS].all()
    per_head = keep.sum(-1).flatten()
    if allocation == "head":
        assert per_head.max() - per_head.min() <= 1
    if allocation == "layer":
        per_layer = keep.sum(dim=(1, 2))
        assert per_layer.max() - per_layer.min() <= 1
    assert per_head.min() >= s.protected.sum()  # the floor: no head is emptied


def test_global_budget_follows_the_scores_across_layers():
    scores = torch.rand(3, 2, 100, generator=torch.Generator().manual_seed(0))
    scores[1] += 1  # layer 1 matters most
    protected = torch.zeros(100, dtype=torch.bool)
    protected[:4] = True
    per_layer = allocate(scores, 0.3, "global", protected).sum(dim=(1, 2))
    assert per_layer.tolist() == [8, 164, 8]  # the sinks elsewhere, the rest of the budget (180 in all) to layer 1
    assert allocate(scores, 0.3, "layer", protected).sum(dim=(1, 2)).tolist() == [60, 60, 60]


def test_ratio_below_the_floor_is_refused(scored):
    s = scored["kvzip"]
    with pytest.raises(KvcError, match="at least"):
        allocate(s.scores, 0.001, "global", s.protected)


def test_protected_positions_are_the_template(prefilled):
    protected = protected_positions(prefilled.layout)
    assert protected[: prefilled.layout.document_start].all()
    assert not protected[max(SINK_TOKENS, prefilled.layout.document_start) : prefilled.layout.document_end].any()


def _logits_with_head_mask(model, ids: list[int], context: int, keep: torch.Tensor) -> torch.Tensor:
    """Reference: the full sequence with eager attention and a per-head 4D mask that hides, from the tokens after
    the context, the context entries `keep` (layers, kv_heads, tokens) drops. Layers differ, so each layer gets its
    own mask through a forward pre-hook."""
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    handles = []
    heads = model.config.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        allowed = causal.expand(heads, n, n).clone()
        per_query_head = keep[i].repeat_interleave(heads // keep.shape[1], dim=0)  # (heads, context)
        allowed[:, context:, :context] &= per_query_head[:, None, :]
        mask = torch.where(allowed, 0.0, float("-inf"))[None]

        def hook(module, args, kwargs, mask=mask):
            kwargs["attention_mask"] = mask
            return args, kwargs

        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return model(torch.tensor([ids])).logits[0, context:]
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()


@pytest.mark.parametrize("allocation", [None, *ALLOCATIONS])
def test_pruned_file_attends_exactly_to_the_kept_entries(tmp_path, prefilled, scored, allocation):
    """Through the file: pruned layout → load → logits equal a full forward that masks exactly the dropped
    entries per head; allocation None keeps every entry, and then the logits equal the dense cache's."""
    pre, lm = prefilled, prefilled.lm
    everything = allocation is None
    if everything:
        pruning = Pruning(torch.ones_like(scored["kvzip"].scores, dtype=torch.bool), "kvzip", "global", 1.0, 0.0)
    else:
        pruning = replace(scored["kvzip"].keep(0.5, allocation), queries=None)  # stored values as computed
    keep = pruning.keep
    write_kvc(pre, tmp_path / "p.kvc", codec="zstd", bits=32, pruning=pruning)
    with kvc_attention_in(lm.model):
        kv = load(tmp_path / "p.kvc", lm)
        assert isinstance(kv.cache, PrunedCache)
        ids = kv.prompt_ids(lm.tokenizer, QUESTION)[0].tolist()
        with torch.inference_mode():
            got = lm.model(torch.tensor([ids[pre.tokens :]]), past_key_values=kv.cache).logits[0]
    expected = _logits_with_head_mask(lm.model, ids, pre.tokens, keep)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    if everything:
        with torch.inference_mode():
            full = lm.model(torch.tensor([ids])).logits[0, pre.tokens :]
        assert torch.allclose(got, full, atol=1e-4)


@pytest.mark.parametrize("name", list(SCORERS))
def test_ratio_one_with_any_scorer_is_exact(tmp_path, tiny, name):
    compress_text(TEXT, tmp_path / "d.kvc", preset="lossless", model=tiny, scorer=name, bits=32)
    with kvc_attention_in(tiny.model):
        kv = load(tmp_path / "d.kvc", tiny)
        ids = kv.prompt_ids(tiny.tokenizer, QUESTION)
        out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=kv.cache,
                                  max_new_tokens=8, do_sample=False)
    plain = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out.tolist() == plain.tolist()


def test_generate_on_a_pruned_cache_and_reset(tmp_path, tiny):
    compress_text(TEXT, tmp_path / "p.kvc", preset="lossless", model=tiny, scorer="kvzip", ratio=0.3)
    kv = load(tmp_path / "p.kvc", tiny)
    assert kv.cache.kept_ratio() == pytest.approx(0.3, abs=1e-3)
    ids = kv.prompt_ids(tiny.tokenizer, QUESTION)
    runs = []
    for _ in range(2):
        out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=kv.cache,
                                  max_new_tokens=6, do_sample=False)
        runs.append(out[0, ids.shape[1] :].tolist())
        assert kv.cache.get_seq_length() > kv.input_ids.shape[1]
        kv.reset()
        assert kv.cache.get_seq_length() == kv.input_ids.shape[1]
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_loaded_memory_scales_with_the_ratio(tmp_path, tiny):
    sizes = {}
    for ratio in (1.0, 0.5, 0.25):
        compress_text(TEXT, tmp_path / f"{ratio}.kvc", preset="lossless", model=tiny, scorer="knorm", ratio=ratio,
                      bits=32)
        sizes[ratio] = load(tmp_path / f"{ratio}.kvc", tiny).cache_bytes()
    # Each kept entry also holds its logit bias: one value beside its keys' and values' 2 × head_dim.
    config = tiny.model.config
    per_entry = 1 + 1 / (2 * config.hidden_size // config.num_attention_heads)
    assert sizes[0.5] / sizes[1.0] == pytest.approx(0.5 * per_entry, abs=0.002)
    assert sizes[0.25] / sizes[1.0] == pytest.approx(0.25 * per_entry, abs=0.002)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_a_sliding_window_layer_keeps_only_what_its_window_holds(allocation):
    """Layers 0-2 hold the last 511 of 2,000 positions (a window of 512), layer 3 all: nothing outside a window is
    kept, the budget counts what the layers hold, and every layer keeps the template it holds."""
    scores = torch.rand(4, 2, 2000, generator=torch.Generator().manual_seed(1))
    protected = torch.zeros(2000, dtype=torch.bool)
    protected[:SINK_TOKENS] = protected[-3:] = True  # sinks, and the template after the document
    visible = torch.ones(4, 2000, dtype=torch.bool)
    visible[:3, : 2000 - 511] = False
    keep = allocate(scores, 0.25, allocation, protected, visible)
    assert not (keep & ~visible[:, None, :]).any()
    assert keep[..., protected][visible[:, None, protected].expand_as(keep[..., protected])].all()
    if allocation != "position":  # position keeps its positions where a layer holds them: fewer in the windows
        assert keep.sum() == round(0.25 * 2 * int(visible.sum()))


def test_windows_take_their_own_share_of_a_global_budget():
    """One threshold over layers of two kinds starves the windows (their KVzip scores run lower): they are kept whole
    when they cost at most half the budget, else they share a tenth of it."""
    scores = torch.rand(4, 1, 20_000, generator=torch.Generator().manual_seed(2))
    scores[:3] /= 100  # the windows score low, as KVzip's reconstruction rates them
    protected = torch.zeros(20_000, dtype=torch.bool)
    protected[:SINK_TOKENS] = True
    visible = torch.ones(4, 20_000, dtype=torch.bool)
    visible[:3, : 20_000 - 511] = False
    whole = allocate(scores, 0.25, "global", protected, visible)  # windows: 1,533 of a 5,383 budget
    assert whole[:3].sum() == 3 * 511 and whole.sum() == round(0.25 * int(visible.sum()))
    short = allocate(scores[..., -2_000:], 0.25, "global", protected[-2_000:], visible[:, -2_000:])
    assert short[:3].sum() == round(0.1 * round(0.25 * int(visible[:, -2_000:].sum())))
