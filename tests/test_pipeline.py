"""compress → .kvc → load on tiny random Qwen2 and Llama models: exactness, positions, identity, atomicity."""

import pytest
import torch

from kvc_format import KvcReader, KvcWriter
from kvzip_cli import KvcError, compress_text, load
from kvzip_cli.document import layout_prompt
from kvzip_cli.load.answer import ask
from kvzip_cli.prefill import prefill

from fixtures import QUESTIONS, TEXT, cached, tiny_model, uncached


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_bits32_is_exact(tmp_path, tiny, codec):
    path = tmp_path / "doc.kvc"
    compress_text(TEXT, path, preset="lossless", model=tiny, codec=codec, bits=32)
    kv = load(path, tiny)
    for question in QUESTIONS:
        ids = kv.prompt_ids(tiny.tokenizer, question)
        ref_tokens, ref_logits = uncached(tiny, ids, 12)
        got_tokens, got_logits = cached(tiny, kv, ids, 12)
        assert got_tokens == ref_tokens
        torch.testing.assert_close(got_logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_bits16_logits_within_fp16_rounding(tmp_path, tiny):
    path = tmp_path / "doc.kvc"
    compress_text(TEXT, path, preset="lossless", model=tiny, bits=16)
    with KvcReader(path) as r:
        assert {r.read_layer(0)[0].dtype, r.read_layer(0)[1].dtype} == {"float16"}
    kv = load(path, tiny)
    ids = kv.prompt_ids(tiny.tokenizer, QUESTIONS[0])
    _, ref_logits = uncached(tiny, ids, 8)
    with torch.inference_mode():
        out = tiny.model(ids[:, kv.input_ids.shape[1]:], past_key_values=kv.cache)
    full = tiny.model(ids).logits[0, kv.input_ids.shape[1]:]
    torch.testing.assert_close(out.logits[0], full, atol=2e-3, rtol=0)
    assert ref_logits.shape[0] == 8


def test_chunk_size_does_not_change_the_cache(tiny):
    ids = layout_prompt(tiny.tokenizer, TEXT).prefix_ids
    one = prefill(tiny.model, ids, 10_000, lambda n: None)
    many = prefill(tiny.model, ids, 7, lambda n: None)
    for a, b in zip(one.layers, many.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_header_records_prompt_and_settings(tmp_path, tiny):
    path = tmp_path / "doc.kvc"
    result = compress_text(TEXT, path, preset="lossless", model=tiny, codec="zstd")
    layout = layout_prompt(tiny.tokenizer, TEXT)
    with KvcReader(path) as r:
        assert r.header["prompt"]["prefix_ids"] == layout.prefix_ids
        assert r.header["prompt"]["question_suffix"].endswith("<|im_start|>assistant\n")
        assert r.header["settings"]["codec"] == "zstd" and r.header["settings"]["bits"] == 16
        assert r.geometry.layers == 3 and r.geometry.kv_heads == 2 and r.geometry.head_dim == 16
        r.verify()
    assert result.tokens == len(layout.prefix_ids)
    assert result.raw_bytes == 2 * 3 * 2 * 16 * result.tokens * 2
    assert result.file_bytes == path.stat().st_size
    assert result.compression == pytest.approx(result.raw_bytes / result.file_bytes)


def test_cached_answer_positions_continue_after_document(tmp_path, tiny):
    path = tmp_path / "doc.kvc"
    compress_text(TEXT, path, preset="lossless", model=tiny, bits=32)
    kv = load(path, tiny)
    assert kv.cache.get_seq_length() == kv.input_ids.shape[1]
    first = ask(tiny.model, tiny.tokenizer, kv, QUESTIONS[0], 6)
    assert kv.cache.get_seq_length() == kv.input_ids.shape[1]  # reset after generate
    again = ask(tiny.model, tiny.tokenizer, kv, QUESTIONS[0], 6)
    assert first.token_ids == again.token_ids and len(first.token_ids) > 0


def test_other_weights_with_same_shapes_are_refused(tmp_path, tiny_tokenizer):
    path = tmp_path / "doc.kvc"
    compress_text(TEXT, path, preset="lossless", model=tiny_model("llama", tiny_tokenizer, seed=0))
    with pytest.raises(KvcError, match="weight_digest"):
        load(path, tiny_model("llama", tiny_tokenizer, seed=1))


def test_other_architecture_is_refused(tmp_path, tiny_tokenizer):
    path = tmp_path / "doc.kvc"
    compress_text(TEXT, path, preset="lossless", model=tiny_model("llama", tiny_tokenizer))
    with pytest.raises(KvcError, match="architecture"):
        load(path, tiny_model("qwen2", tiny_tokenizer))


def test_other_tokenizer_is_refused(tmp_path, tiny_tokenizer):
    path = tmp_path / "doc.kvc"
    lm = tiny_model("llama", tiny_tokenizer)
    compress_text(TEXT, path, preset="lossless", model=lm)
    other = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(KvcError, match="tokenizer_digest"):
        load(path, lm.model, other)


def test_same_weights_in_bfloat16_are_accepted(tmp_path, tiny_tokenizer):
    path = tmp_path / "doc.kvc"
    compress_text(TEXT, path, preset="lossless", model=tiny_model("qwen2", tiny_tokenizer))
    bf16 = tiny_model("qwen2", tiny_tokenizer)
    bf16.model.to(torch.bfloat16)
    kv = load(path, bf16)
    assert kv.cache.layers[0].keys.dtype == torch.bfloat16


def test_plain_layout_without_chat_template(tmp_path, tiny_tokenizer):
    plain = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    lm = tiny_model("llama", plain)
    layout = layout_prompt(plain, TEXT)
    assert layout.template == "plain" and layout.question_prefix == " "
    path = tmp_path / "doc.kvc"
    compress_text(TEXT, path, preset="lossless", model=lm, bits=32)
    kv = load(path, lm)
    ids = kv.prompt_ids(plain, "What is licensed?")
    assert plain.decode(ids[0]).endswith("Question: What is licensed?\nAnswer:")
    assert cached(lm, kv, ids, 5)[0] == uncached(lm, ids, 5)[0]


def test_document_longer_than_context_is_refused(tmp_path, tiny):
    tiny.model.config.max_position_embeddings = 64
    with pytest.raises(KvcError, match="handles at most 64"):
        compress_text(TEXT, tmp_path / "doc.kvc", preset="lossless", model=tiny)
    assert not (tmp_path / "doc.kvc").exists()


@pytest.mark.parametrize(
    "options,message",
    [({"ratio": 0.0}, "out of range"), ({"ratio": 1.5}, "out of range"), ({"scorer": "h2o"}, "unknown scorer"),
     ({"allocation": "even"}, "unknown allocation"), ({"bits": 5}, "use 16 or 32"),
     ({"bits": 16, "codec": "ans"}, "entropy-codes quantized"), ({"preset": "tiny"}, "unknown preset"),
     ({"codec": "lzma"}, "unknown codec"), ({"chunk_size": 0}, "chunk")],
)
def test_bad_settings_are_refused(tmp_path, tiny, options, message):
    with pytest.raises(KvcError, match=message):
        compress_text(TEXT, tmp_path / "doc.kvc", model=tiny, **{"preset": "lossless", **options})
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_writing_leaves_nothing(tmp_path, tiny, monkeypatch):
    original = KvcWriter.add_section
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KvcWriter, "add_section", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress_text(TEXT, tmp_path / "doc.kvc", preset="lossless", model=tiny)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_survives_a_failed_run(tmp_path, tiny, monkeypatch):
    path = tmp_path / "doc.kvc"
    compress_text(TEXT, path, preset="lossless", model=tiny)
    before = path.read_bytes()
    monkeypatch.setattr(KvcWriter, "add_section", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        compress_text(TEXT + " more", path, preset="lossless", model=tiny)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["doc.kvc"]


def test_exactness_check_detects_a_wrong_cache(tmp_path, tiny):
    """Control for test_bits32_is_exact: the same comparison fails when the cache is off."""
    path = tmp_path / "doc.kvc"
    compress_text(TEXT, path, preset="lossless", model=tiny, bits=32)
    kv = load(path, tiny)
    kv.cache.layers[1].values.mul_(0.5)
    ids = kv.prompt_ids(tiny.tokenizer, QUESTIONS[0])
    _, ref_logits = uncached(tiny, ids, 4)
    _, got_logits = cached(tiny, kv, ids, 4)
    assert (got_logits - ref_logits).abs().max() > 1e-2


def test_tokenizer_digest_is_reused_until_the_tokenizer_changes():
    from kvzip_cli.models.fingerprint import _cached_tokenizer_fields, tokenizer_digest

    from fixtures import train_tokenizer

    def digest(tokenizer):
        return _cached_tokenizer_fields(tokenizer, 1024)["tokenizer_digest"]

    tokenizer = train_tokenizer()
    first = digest(tokenizer)
    assert first == tokenizer_digest(tokenizer) == digest(tokenizer)
    vocab = _cached_tokenizer_fields(tokenizer, 1024)["vocab"]
    tokenizer.add_tokens(["<kvc-new-token>"])
    assert digest(tokenizer) == tokenizer_digest(tokenizer) != first
    assert _cached_tokenizer_fields(tokenizer, 1024)["vocab"]["count"] == vocab["count"] + 1
    tokenizer.chat_template = "{{ messages }}"
    assert digest(tokenizer) == tokenizer_digest(tokenizer)
