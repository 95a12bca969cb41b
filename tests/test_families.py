"""Every tested decoder family (tests/family_models.py) on a tiny random-weight model: exact at the lossless setting,
a pruned file equal to the full model with the dropped entries masked, keys stored without RoPE matching keys
stored with it to quantization error, the torch-free export agreeing with the loader; and the architectures kvc
cannot cache refused at compress, with one line saying why."""

import sys

import numpy as np
import pytest
import torch
import transformers

from kvc_format import KvcReader, MetadataError, load_file
from kvzip_cli import KvcError, LoadedModel, compress_text, load
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.settings import QuantOptions
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.context import layer_windows
from kvzip_cli.load.pruned_cache import PrunedCache, PrunedLayer
from kvzip_cli.models.families import TESTED, check_config
from kvzip_cli.prune.scoring import score_context

from attacks import split
from family_models import FAMILIES, PARTIAL_ROTARY, PRE_ROPE, SLIDING, WINDOW, family_model, masked_logits
from fixtures import FAMILY_TEXT, cached, uncached
from kvc_bytes import assemble
from spec_reader import keys_with_rope, read_file

QUESTION = "Who may use the work?"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_tokenizer):
    """(family name, its prefilled document)."""
    return request.param, prefill_document(FAMILY_TEXT, family_model(request.param, tiny_tokenizer), chunk_size=100)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def held(prefilled_layer, loaded_layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefilled keys and values of the positions a loaded dense layer holds (a sliding-window layer only the
    last window − 1, as the prefill's own)."""
    n = loaded_layer.keys.shape[-2]
    return prefilled_layer.keys[..., -n:, :], prefilled_layer.values[..., -n:, :]


def test_tested_families_are_the_ones_listed():
    built = {model_class.__name__ for model_class, _, _ in FAMILIES.values()}
    assert built == {model_class for _, model_class in TESTED}


def test_lossless_is_exact(tmp_path, family):
    """bits 32, every entry: the same greedy tokens as the model on the whole prompt without a cache, logits
    within float tolerance; sliding-window layers hold only the window."""
    name, pre = family
    lm, path = pre.lm, tmp_path / "d.kvc"
    windows = layer_windows(lm.model.config)
    assert (WINDOW in windows) == (name in SLIDING) and pre.tokens > 10 * WINDOW
    compress_text(FAMILY_TEXT, path, preset="lossless", model=lm, bits=32)
    kv = load(path, lm)
    ids = kv.prompt_ids(lm.tokenizer, QUESTION)
    want_tokens, want_logits = uncached(lm, ids, 8)
    got_tokens, got_logits = cached(lm, kv, ids, 8)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    for layer, window in zip(kv.cache.layers, windows, strict=True):
        assert layer.keys.shape[-2] == (pre.tokens if window is None else window - 1)


def _pruned(tmp_path, pre, scorer: str = "kvzip", **write):
    pruning = score_context(pre.lm, pre.cache, pre.layout, scorer, refit=False).keep(0.5)
    path = tmp_path / "p.kvc"
    write_kvc(pre, path, pruning=pruning, **write)
    return pruning, path


def test_pruned_file_attends_exactly_to_the_kept_entries(tmp_path, family):
    """Half the entries kept (KVzip): the question in one forward, then three greedy tokens one at a time (the window
    moving on), give the logits of a full forward that masks exactly the dropped entries per head."""
    _, pre = family
    lm = pre.lm
    pruning, path = _pruned(tmp_path, pre, codec="zstd", bits=32)
    kv = load(path, lm)
    assert isinstance(kv.cache, PrunedCache)
    ids, logits = _question_then_greedy(lm, kv, pre.tokens, 3)
    want = masked_logits(lm.model, ids, pre.tokens, pruning.keep)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def _question_then_greedy(lm, kv, context: int, steps: int) -> tuple[list[int], torch.Tensor]:
    """The question in one forward over the loaded cache, then `steps` greedy tokens one at a time: (every token id,
    the logits of every position after the context)."""
    ids = kv.prompt_ids(lm.tokenizer, QUESTION)[0].tolist()
    with torch.inference_mode():
        logits = [lm.model(torch.tensor([ids[context:]]), past_key_values=kv.cache).logits[0]]
        for _ in range(steps):
            ids.append(int(logits[-1][-1].argmax()))
            logits.append(lm.model(torch.tensor([ids[-1:]]), past_key_values=kv.cache).logits[0])
    return ids, torch.cat(logits)


def test_a_logit_bias_is_added_where_the_reference_adds_it(tmp_path, family, monkeypatch):
    """The test above with a random logit bias on every kept entry (as a file's kv_layer_bias sections give it): the
    loaded cache adds it after any soft-capping and within the sliding window, as the eager reference does."""
    _, pre = family
    lm = pre.lm
    pruning, path = _pruned(tmp_path, pre, codec="zstd", bits=32)
    bias = torch.randn(pruning.keep.shape, generator=torch.Generator().manual_seed(0))
    kept = [torch.cat([bias[i, h][keep] for h, keep in enumerate(layer)]).numpy()
            for i, layer in enumerate(pruning.keep)]
    monkeypatch.setattr(KvcReader, "read_bias", lambda self, layer: kept[layer])
    monkeypatch.setattr(KvcReader, "bias_layers", tuple(range(len(kept))))
    ids, logits = _question_then_greedy(lm, load(path, lm), pre.tokens, 2)
    want = masked_logits(lm.model, ids, pre.tokens, pruning.keep, bias)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert (want - masked_logits(lm.model, ids, pre.tokens, pruning.keep)).abs().max() > 1e-2


@pytest.mark.parametrize("name,trait", [("mistral", "window"), ("gemma2", "window"), ("gemma3", "window"),
                                        ("phi3", "window"), ("gemma2", "softcap")])
def test_pruned_comparison_sees_the_trait(tmp_path, tiny_tokenizer, monkeypatch, name, trait):
    """Control for the test above: ignoring the sliding window, or Gemma 2's soft-capping, in the pruned cache's
    attention changes the logits, so the families' documents and configs exercise both."""
    lm = family_model(name, tiny_tokenizer)
    pre = prefill_document(FAMILY_TEXT, lm, chunk_size=100)
    pruning, path = _pruned(tmp_path, pre, codec="zstd", bits=32)
    kv = load(path, lm)
    ids = kv.prompt_ids(lm.tokenizer, QUESTION)[0].tolist()
    if trait == "window":
        for layer in kv.cache.layers:
            layer.window = None
    else:
        attend = PrunedLayer.attend
        monkeypatch.setattr(PrunedLayer, "attend", lambda self, query, scaling, softcap: attend(self, query, scaling))
    with torch.inference_mode():
        got = lm.model(torch.tensor([ids[pre.tokens :]]), past_key_values=kv.cache).logits[0]
    assert (got - masked_logits(lm.model, ids, pre.tokens, pruning.keep)).abs().max() > 1e-2


def _quantized(tmp_path, pre, pre_rope: bool | None):
    path = tmp_path / f"q-{pre_rope}.kvc"
    write_kvc(pre, path, codec="ans", bits=8, quant=QuantOptions(pre_rope=pre_rope))
    with KvcReader(path) as reader:
        key_rope = reader.geometry.key_rope
    return key_rope, load(path, pre.lm).cache


def test_keys_stored_without_rope_match_keys_stored_with_it(tmp_path, family):
    """8 bits, the whole cache: keys stored with RoPE removed (and rotated again at load) and keys stored as computed
    are both the prefilled ones within a fraction of a percent (RoPE re-applied at wrong positions or on the wrong
    channels would be off by tens of percent); partial rotary records only its rotary frequencies. Per-layer-type
    RoPE (Gemma 3) cannot be recorded in a file: there keys keep their RoPE, and asking for pre-RoPE is refused."""
    name, pre = family
    rope, applied = _quantized(tmp_path, pre, pre_rope=False)
    assert rope == "applied"
    default_rope, default = _quantized(tmp_path, pre, pre_rope=None)
    if name in PRE_ROPE:
        assert default_rope == "removed"
        caches = [applied, default]
        with KvcReader(tmp_path / "q-None.kvc") as reader:
            rotary = 2 * len(reader.geometry.rope_inv_freq)
            assert (rotary < reader.geometry.head_dim) == (name in PARTIAL_ROTARY)
            stored = [torch.from_numpy(layer.keys.data) for layer in reader.read_layers()]
            firsts = [reader.geometry.first_position(i) for i in range(reader.geometry.layers)]
        # What kvc stores is what the model rotates: its own apply_rotary_pos_emb turns the stored keys into the
        # cached ones (kvc's RoPE could be any invertible map and still pass the round trip below). A sliding-window
        # layer stores its window only.
        apply_rope = sys.modules[type(pre.lm.model).__module__].apply_rotary_pos_emb
        for keys, want, first in zip(stored, pre.cache.layers, firsts, strict=True):
            want = want.keys  # the prefill holds what the file stores: a sliding-window layer its window
            keys = keys.view(want.shape)
            cos, sin = pre.lm.model.base_model.rotary_emb(keys, torch.arange(first, pre.tokens)[None])
            _, rotated = apply_rope(keys, keys, cos, sin)
            assert relative_error(rotated, want) < 0.01
    else:
        assert default_rope == "applied"
        with pytest.raises(KvcError, match="per layer type"):
            _quantized(tmp_path, pre, pre_rope=True)
        caches = [applied]
    for i, want in enumerate(pre.cache.layers):
        for cache in caches:
            keys, values = held(want, cache.layers[i])
            assert relative_error(cache.layers[i].keys, keys) < 0.01
            assert relative_error(cache.layers[i].values, values) < 0.01
        assert relative_error(default.layers[i].keys, applied.layers[i].keys) < 0.02  # two quantization errors


def test_export_matches_the_loader(tmp_path, family):
    """A pruned 4-bit file (keys without RoPE where the family allows): the torch-free export, RoPE restored from
    the file alone, holds what `kvc load` gives the model, head by head, for every entry the loaded layer keeps
    (a sliding-window layer drops the entries no later token can see)."""
    name, pre = family
    _, path = _pruned(tmp_path, pre, scorer="compactor", codec="ans", bits=4)
    with KvcReader(path) as reader:
        assert reader.geometry.key_rope == ("removed" if name in PRE_ROPE else "applied")
    kv = load(path, pre.lm)
    exported = load_file(path)
    for i, (layer, window) in enumerate(zip(kv.cache.layers, layer_windows(pre.lm.model.config), strict=True)):
        for head, (keys, values) in enumerate(zip(layer.context_keys, layer.context_values, strict=True)):
            prefix = f"layers.{i}.heads.{head}."
            positions = torch.from_numpy(exported[prefix + "positions"])
            seen = positions > pre.tokens - window if window else torch.ones_like(positions, dtype=torch.bool)
            torch.testing.assert_close(torch.from_numpy(exported[prefix + "keys"])[seen], keys[0].float(),
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.from_numpy(exported[prefix + "values"])[seen], values[0].float())


def test_a_file_made_for_other_windows_is_refused(tmp_path, tiny_tokenizer):
    """The fingerprint does not hold the window; the file's own windows (format 1.6) are checked against the model's
    before anything is read: a model given another window would attend past what the file holds."""
    lm = family_model("mistral", tiny_tokenizer)
    compress_text(FAMILY_TEXT, tmp_path / "m.kvc", preset="lossless", model=lm)
    lm.model.config.sliding_window = 2 * WINDOW
    with pytest.raises(KvcError, match=f"made for a model with windows of {WINDOW} on .* has windows of {2 * WINDOW}"):
        load(tmp_path / "m.kvc", lm)


def test_partial_rotary_needs_format_1_4(tmp_path, tiny_tokenizer):
    """RoPE on part of the head is recorded with fewer frequencies than head_dim / 2, which 1.4 allows: a file saying
    it is 1.3 is refused, and SPEC.md's own reader re-applies RoPE to the rotary channels as kvc_format does."""
    pre = prefill_document(FAMILY_TEXT, family_model("phi3", tiny_tokenizer), chunk_size=100)
    path = tmp_path / "p.kvc"
    write_kvc(pre, path, codec="ans", bits=4, quant=QuantOptions(pre_rope=True))
    header, sections, minor = split(path.read_bytes())
    assert minor >= 4 and len(header["cache"]["rope_inv_freq"]) == 4  # rotary 8 of head_dim 16
    exported, ours = load_file(path), read_file(path)
    for i, layer in enumerate(ours.layers):
        keys, rows = keys_with_rope(layer, header["cache"]), np.cumsum([0] + [len(p) for p in layer.positions])
        for head in range(len(layer.positions)):
            np.testing.assert_allclose(keys[rows[head] : rows[head + 1]], exported[f"layers.{i}.heads.{head}.keys"],
                                       rtol=1e-6, atol=1e-6)
    old = tmp_path / "old.kvc"
    old.write_bytes(assemble(header, sections, minor=3))
    with pytest.raises(MetadataError, match="must hold 8 floats"):
        KvcReader(old)


def _config(name: str):
    """Tiny configs of architectures kvc refuses (transformers builds them in milliseconds)."""
    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=32)
    t = transformers
    return {
        "mamba": (t.MambaForCausalLM, t.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4)),
        "jamba": (t.JambaForCausalLM, t.JambaConfig(**small, attn_layer_period=2, attn_layer_offset=1, num_experts=2,
                                                    expert_layer_period=2, mamba_d_state=4)),
        "falcon_h1": (t.FalconH1ForCausalLM, t.FalconH1Config(**small, mamba_d_ssm=16, mamba_n_heads=2,
                                                              mamba_d_head=8, mamba_d_state=4)),
        "qwen3_next": (t.Qwen3NextForCausalLM, t.Qwen3NextConfig(
            **small, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
            linear_value_head_dim=8, num_experts=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
            layer_types=["linear_attention", "full_attention"])),
        "recurrent_gemma": (t.RecurrentGemmaForCausalLM, t.RecurrentGemmaConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=32, lru_width=16)),
        "deepseek_v3": (t.DeepseekV3ForCausalLM, t.DeepseekV3Config(
            **small, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
            n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, first_k_dense_replace=1)),
        "t5": (t.T5ForConditionalGeneration, t.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                        num_heads=2)),
        # What AutoModelForCausalLM makes of a BART checkpoint: its decoder alone, no longer is_encoder_decoder.
        "bart": (t.BartForCausalLM, t.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                                 encoder_attention_heads=2, decoder_attention_heads=2,
                                                 encoder_ffn_dim=32, decoder_ffn_dim=32)),
        "llama4": (t.Llama4ForCausalLM, t.Llama4TextConfig(**small, head_dim=8, intermediate_size_mlp=32,
                                                           num_local_experts=2, attention_chunk_size=16)),
    }[name]


@pytest.mark.parametrize("name,why", [
    ("mamba", "state-space"), ("jamba", "mamba layers"), ("falcon_h1", "state-space"),
    ("qwen3_next", "linear_attention layers"), ("recurrent_gemma", "recurrent layers"),
    ("deepseek_v3", "multi-head latent attention"), ("t5", "encoder-decoder"), ("bart", "encoder-decoder"),
    ("llama4", "chunked attention"),
])
def test_unsupported_architectures_are_refused_before_the_prefill(tmp_path, tiny_tokenizer, monkeypatch, name, why):
    """One line saying why, before any costly work, and no file."""
    model_class, config = _config(name)
    lm = LoadedModel(model_class(config).eval(), tiny_tokenizer, f"tiny-{name}")
    prefilled = sys.modules["kvzip_cli.compress.prefilled"]
    monkeypatch.setattr(prefilled, "prefill", lambda *a, **k: pytest.fail("prefilled"))
    with pytest.raises(KvcError, match=why) as refused:
        compress_text(FAMILY_TEXT, tmp_path / "x.kvc", model=lm, bits=4)
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KvcError, match=why):
        check_config(config)  # from the config alone, before any weights are loaded
