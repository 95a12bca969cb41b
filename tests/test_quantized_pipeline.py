"""compress → quantized .kvc → load on tiny random Qwen2 and Llama models: RoPE removal and re-application, exact
sinks, pruning + quantization, presets, errors before the costly work."""

import sys

import numpy as np
import pytest
import torch

from kvc_format import KvcReader
from kvc_format.rope import rotate_rows
from kvzip_cli import KvcError, compress_text, load
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.settings import QuantOptions
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.load.answer import ask
from kvzip_cli.load.pruned_cache import PrunedCache
from kvzip_cli.prune.scoring import score_context

from fixtures import QUESTIONS, TEXT


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def prefilled(request, tiny_tokenizer):
    from fixtures import tiny_model

    return prefill_document(TEXT, tiny_model(request.param, tiny_tokenizer), chunk_size=128)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("pre_rope", [True, False])
def test_dense_quantized_cache_matches_the_original(tmp_path, prefilled, pre_rope):
    """8 bits, the whole cache: loaded keys and values are the prefilled ones within a fraction of a percent (a
    RoPE re-applied at wrong positions would be off by tens of percent), sinks exactly (to float16)."""
    pre = prefilled
    path = tmp_path / "q.kvc"
    write_kvc(pre, path, codec="ans", bits=8, quant=QuantOptions(pre_rope=pre_rope))
    with KvcReader(path) as r:
        assert r.geometry.key_rope == ("removed" if pre_rope else "applied")
    kv = load(path, pre.lm)
    assert not isinstance(kv.cache, PrunedCache)  # every entry kept: an ordinary dense cache
    for got, want in zip(kv.cache.layers, pre.cache.layers, strict=True):
        assert relative_error(got.keys, want.keys) < 0.01
        assert relative_error(got.values, want.values) < 0.01
        torch.testing.assert_close(got.keys[:, :, :4], want.keys[:, :, :4], atol=2e-3, rtol=2e-3)


def test_error_grows_as_bits_shrink(tmp_path, prefilled):
    pre = prefilled
    errors, sizes = [], []
    for bits in (8, 4, 3, 2):
        path = tmp_path / f"{bits}.kvc"
        made = write_kvc(pre, path, codec="ans", bits=bits)
        kv = load(path, pre.lm)
        errors.append(sum(relative_error(g.keys, w.keys) for g, w in zip(kv.cache.layers, pre.cache.layers,
                                                                          strict=True)))
        sizes.append(made.file_bytes)
    assert errors == sorted(errors) and sizes == sorted(sizes, reverse=True)


def test_pruned_quantized_file_answers(tmp_path, prefilled):
    """Pruning and quantization together: a PrunedCache holding exactly the kept entries, answering questions."""
    pre = prefilled
    pruning = score_context(pre.lm, pre.cache, pre.layout, "kvzip").keep(0.4)
    path = tmp_path / "pq.kvc"
    made = write_kvc(pre, path, codec="ans", bits=4, pruning=pruning)
    assert made.compression > 1 / 0.4 * 2.5  # 40% of the entries at well under 8 bits each
    kv = load(path, pre.lm)
    assert isinstance(kv.cache, PrunedCache)
    assert kv.cache.kept_ratio() == pytest.approx(made.kept_ratio)
    for question in QUESTIONS:
        answer = ask(pre.lm.model, pre.lm.tokenizer, kv, question, 5)
        assert len(answer.token_ids) == 5


def test_presets_set_the_file_and_options_override_them(tmp_path, prefilled):
    pre = prefilled
    made = {name: compress_text(TEXT, tmp_path / f"{name}.kvc", model=pre.lm, preset=name)
            for name in ("lossless", "balanced", "small")}
    assert made["lossless"].bits == 16 and made["lossless"].kept_ratio == 1.0
    assert made["balanced"].bits == 3 and made["balanced"].codec == "ans"
    assert made["small"].file_bytes < made["balanced"].file_bytes < made["lossless"].file_bytes
    assert made["small"].key_bits == 3 and made["small"].bits == 2
    with KvcReader(tmp_path / "small.kvc") as r:
        assert r.header["settings"]["key_bits"] == 3 and r.header["settings"]["bits"] == 2
    override = compress_text(TEXT, tmp_path / "o.kvc", model=pre.lm, preset="balanced", bits=16, ratio=1.0)
    assert override.codec == "zstd" and override.bits == 16 and override.kept_ratio == 1.0


def test_group_is_checked_before_the_prefill(tmp_path, prefilled, monkeypatch):
    pipeline = sys.modules["kvzip_cli.compress.pipeline"]
    monkeypatch.setattr(pipeline, "prefill_document", lambda *a, **k: pytest.fail("prefill"))
    with pytest.raises(KvcError, match="must divide"):
        compress_text(TEXT, tmp_path / "g.kvc", model=prefilled.lm, bits=4, quant=QuantOptions(value_group=5))
    assert not (tmp_path / "g.kvc").exists()


def test_layer_batches_do_not_change_the_cache(tmp_path, prefilled, monkeypatch):
    """Decoding layer by layer (a tiny batch budget) gives the same cache as all layers in one rANS pass."""
    pre = prefilled
    path = tmp_path / "q.kvc"
    write_kvc(pre, path, codec="ans", bits=4)
    together = load(path, pre.lm)
    monkeypatch.setattr(sys.modules["kvc_format.reader"], "DECODE_BATCH_ELEMENTS", 1)
    with KvcReader(path) as r:
        assert r.layer_batches() == [[layer] for layer in range(r.geometry.layers)]
    apart = load(path, pre.lm)
    for a, b in zip(together.cache.layers, apart.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("rotary", [64, 32])
def test_rope_reapplied_in_place_equals_the_rotation(rotary):
    """The load path's in-place RoPE (half-width gathers, no concatenation) gives exactly the keys of
    `rope.rotate`, on the whole head and on a partial rotary part."""
    from kvzip_cli.load.loader import _rotate_rows
    from kvzip_cli.rope import rotate

    torch.manual_seed(0)
    positions = (np.array([0, 5, 9, 19]), np.array([1, 2]), np.array([7]))
    keys = torch.randn(7, 64)
    freqs = 1.0 / 10000 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary)
    angles = torch.arange(20, dtype=torch.float32)[:, None] * freqs[None]
    cos, sin = torch.cat([angles, angles], dim=-1).cos(), torch.cat([angles, angles], dim=-1).sin()
    rows = torch.from_numpy(np.concatenate(positions))
    expected = rotate(keys, cos[rows], sin[rows])
    assert torch.equal(_rotate_rows(keys.clone(), positions, cos, sin), expected)
    numpy_keys = keys.numpy().copy()
    rotate_rows(numpy_keys, rows.numpy(), cos[:, : rotary // 2].numpy(), sin[:, : rotary // 2].numpy())
    assert torch.equal(torch.from_numpy(numpy_keys), expected)


@pytest.mark.parametrize("decoder", ["numpy", "compiled"])
def test_reader_rotates_pre_rope_keys_as_the_model_would(tmp_path, prefilled, monkeypatch, decoder):
    """A pruned pre-RoPE file read with the model's tables (the compiled dequantizer rotates as it writes each row,
    the numpy one after) gives exactly the keys of `rope.rotate` applied to the keys read without them, and the
    loaded cache holds those keys."""
    from kvc_format import rans
    from kvzip_cli.load.loader import _rope
    from kvzip_cli.rope import rotate

    if decoder == "compiled" and rans._compiled() is None:
        pytest.fail("numba is missing: the compiled decoder is part of the test extra")
    monkeypatch.setenv("KVC_RANS_DECODER", decoder)
    pre = prefilled
    pruning = score_context(pre.lm, pre.cache, pre.layout, "kvzip").keep(0.5)
    path = tmp_path / "pre.kvc"
    write_kvc(pre, path, codec="ans", bits=4, pruning=pruning, quant=QuantOptions(pre_rope=True))
    with KvcReader(path) as r:
        cos, sin = _rope(pre.lm.model, r.geometry.tokens)
        half = cos.shape[1] // 2
        plain = r.read_layers()
        rotated = r.read_layers(rope=(cos[:, :half].numpy(), sin[:, :half].numpy()))
    kv = load(path, pre.lm)
    for layer, (a, b) in enumerate(zip(plain, rotated, strict=True)):
        rows = torch.from_numpy(np.concatenate(a.positions))
        expected = rotate(torch.from_numpy(a.keys.data), cos[rows], sin[rows])
        assert torch.equal(torch.from_numpy(b.keys.data), expected)
        np.testing.assert_array_equal(a.values.data, b.values.data)
        loaded = torch.cat([k[0] for k in kv.cache.layers[layer].context_keys])
        assert torch.equal(loaded, expected.to(loaded.dtype))
