"""Query-weighted key steps (kvzip_cli.compress.key_units): the unit math, the observer, the quantizer and writer
taking the units, and the pipeline recording them."""

import numpy as np
import pytest
import torch

from kvc_format import KvcReader
from kvc_format.quantized import Quantization, encode_layer
from kvc_format.scalar_quantizers import dequantize_keys, quantize_keys
from kvzip_cli.compress.key_units import ENERGY_FLOOR, QueryEnergy, key_units
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.settings import QuantOptions
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.load.loader import load
from kvzip_cli.prefill import prefill

from fixtures import TEXT


def geomean(x: np.ndarray) -> float:
    return float(np.exp(np.log(x).mean()))


def test_steps_shrink_as_the_square_root_of_query_energy():
    """Within a KV head, a channel read with 4× the energy gets half the step; the query heads sharing a KV head
    (grouped like transformers' repeat_kv) add their energies."""
    energy = np.ones((1, 4, 4))  # 4 query heads over 2 KV heads, head_dim 4
    energy[0, 0, 1] = 4.0  # query head 0 (KV head 0), channel 1
    energy[0, 1, 1] = 12.0  # query head 1 (KV head 0), channel 1: KV head 0's channel 1 totals 16 against 2
    energy[0, 3, 2] = 7.0  # query head 3 (KV head 1), channel 2: totals 8 against 2
    units = key_units(energy, np.ones((1, 2)), rotary=0)
    assert units.shape == (1, 2, 4)
    assert units[0, 0, 0] / units[0, 0, 1] == pytest.approx(np.sqrt(16 / 2))
    assert units[0, 1, 0] / units[0, 1, 2] == pytest.approx(2.0)
    assert units[0, 0, 0] == pytest.approx(units[0, 1, 3])


def test_rope_pairs_share_their_energy():
    energy = np.array([[[1.0, 2.0, 9.0, 4.0]]])  # pairs (0, 2) and (1, 3)
    paired = key_units(energy, np.ones((1, 1)), rotary=4)[0, 0]
    assert paired[0] == pytest.approx(paired[2]) and paired[1] == pytest.approx(paired[3])
    assert paired[1] / paired[0] == pytest.approx(np.sqrt(5 / 3))  # mean energies 5 and 3
    alone = key_units(energy, np.ones((1, 1)), rotary=0)[0, 0]
    assert alone[0] / alone[2] == pytest.approx(3.0)
    partial = key_units(energy, np.ones((1, 1)), rotary=2)[0, 0]  # RoPE on channels 0, 1 only (partial rotary)
    assert partial[0] == pytest.approx(partial[1]) and partial[2] / partial[3] == pytest.approx(np.sqrt(4 / 9))


def test_units_keep_the_geometric_mean_of_the_key_rms():
    """The same key_step spends about the same bits: over the whole cache the units' geometric mean is that of the
    per-head RMS steps they replace."""
    rng = np.random.default_rng(0)
    energy = rng.uniform(0.01, 5, (3, 4, 8))
    rms = rng.uniform(0.5, 20, (3, 2))
    units = key_units(energy, rms, rotary=8)
    assert geomean(units) == pytest.approx(geomean(rms))


def test_barely_read_channels_are_bounded():
    energy = np.ones((1, 1, 4))
    energy[0, 0, 3] = 0.0
    units = key_units(energy, np.ones((1, 1)), rotary=0)[0, 0]
    assert units[3] / units[0] == pytest.approx(ENERGY_FLOOR**-0.5)


@pytest.mark.parametrize("case", ["silent layer", "zero keys", "nan energy", "heads do not group", "odd pairs"])
def test_degenerate_statistics_leave_rms_steps(case):
    energy, rms, rotary = np.ones((2, 4, 4)), np.ones((2, 2)), 4
    if case == "silent layer":
        energy[1] = 0
    elif case == "zero keys":
        rms[0, 1] = 0
    elif case == "nan energy":
        energy[0, 0, 0] = np.nan
    elif case == "heads do not group":
        rms = np.ones((2, 3))
    else:
        energy = np.ones((2, 4, 3))
    assert key_units(energy, rms, rotary) is None


def test_weighted_steps_cut_the_logit_error_at_the_same_rate():
    """The reason for the units: with queries that read channels unevenly, steps ∝ 1/sqrt(E[q²]) give a smaller
    attention-logit error E[(q·δk)²] than one step per head, at the same Σ log(step) (the same rate)."""
    rng = np.random.default_rng(1)
    dim, rows = 16, 4000
    reach = np.exp(rng.uniform(-2, 2, dim))  # how strongly queries read each channel
    queries = rng.standard_normal((500, dim)) * reach
    keys = rng.standard_normal((rows, dim)).astype(np.float32) * rng.uniform(0.5, 2, dim).astype(np.float32)
    rms = np.sqrt((keys.astype(np.float64) ** 2).mean())
    energy = (queries**2).mean(0)[None, None]
    units = key_units(energy, np.array([[rms]]), rotary=0)[0]
    assert geomean(units[0]) == pytest.approx(rms)

    def logit_mse(unit):
        code = quantize_keys(keys, np.array([rows]), 0.5, unit)
        error = dequantize_keys(code, np.array([rows])) - keys
        return float(((queries @ error.T) ** 2).mean())

    assert logit_mse(units) < 0.6 * logit_mse(None)


def test_quantizer_takes_the_units_within_half_a_step():
    rng = np.random.default_rng(2)
    rows_per_head = np.array([50, 70])
    keys = rng.standard_normal((120, 8)).astype(np.float32)
    unit = rng.uniform(0.05, 3, (2, 8))
    code = quantize_keys(keys, rows_per_head, 0.3, unit)
    spread = np.stack([np.abs(b - b.mean(0)).max(0) for b in np.split(keys.astype(np.float64), [50])])
    np.testing.assert_allclose(code.step, np.maximum(0.3 * unit, spread / 127).astype(np.float32), rtol=1e-6)
    error = np.abs(dequantize_keys(code, rows_per_head) - keys)
    assert (error <= code.step[np.repeat([0, 1], rows_per_head)] * 0.5 + 1e-5).all()


@pytest.mark.parametrize("unit", [np.zeros((2, 8)), np.full((2, 8), np.nan), np.ones((3, 8)), -np.ones((2, 8))])
def test_writer_refuses_bad_units(unit):
    rng = np.random.default_rng(3)
    positions = [np.arange(10, 40), np.arange(5, 25)]
    keys = rng.standard_normal((50, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="key units"):
        encode_layer(keys, keys.copy(), positions, Quantization(), unit)


def test_observer_averages_over_chunks_and_batches():
    energy = QueryEnergy()
    a, b = torch.randn(1, 3, 5, 4), torch.randn(1, 3, 2, 4)
    for layer in (0, 1):
        assert energy(layer, a, None, None, 1.0) is None  # SDPA still computes the attention
        energy(layer, b, None, None, 1.0)
    want = torch.cat([a, b], 2).pow(2).mean((0, 2)).double().numpy()
    np.testing.assert_allclose(energy.mean(), np.stack([want, want]), rtol=1e-6)
    gap = QueryEnergy()
    gap(1, a, None, None, 1.0)
    assert gap.mean() is None and QueryEnergy().mean() is None


@pytest.fixture(scope="module")
def prefilled(tiny_tokenizer):
    from fixtures import tiny_model

    return prefill_document(TEXT, tiny_model("llama", tiny_tokenizer), chunk_size=100)


def test_prefill_records_query_energy_and_keeps_the_cache(prefilled):
    """Watching the queries does not change the prefilled cache."""
    pre, config = prefilled, prefilled.lm.model.config
    assert pre.query_energy.shape == (config.num_hidden_layers, config.num_attention_heads,
                                      config.hidden_size // config.num_attention_heads)
    assert (pre.query_energy > 0).all()
    plain = prefill(pre.lm.model, pre.layout.prefix_ids, 100, lambda n: None)
    for got, want in zip(pre.cache.layers, plain.layers, strict=True):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


@pytest.mark.parametrize("weighted", [True, False])
def test_files_record_their_key_units(tmp_path, prefilled, weighted):
    path = tmp_path / "k.kvc"
    write_kvc(prefilled, path, codec="ans", bits=4, quant=QuantOptions(query_weighted_keys=weighted))
    with KvcReader(path) as r:
        assert r.header["settings"]["key_units"] == ("query" if weighted else "rms")
        steps = np.stack([layer.arrays["key_step"] for layer in r.read_undecoded()])
    spread = steps.max(-1) / steps.min(-1)  # per (layer, head): one RMS step for every channel, or weighted steps
    assert (spread > 1.05).all() if weighted else (spread == 1).all()
    kv = load(path, prefilled.lm)
    for got, want in zip(kv.cache.layers, prefilled.cache.layers, strict=True):
        assert float((got.keys - want.keys).norm() / want.keys.norm()) < 0.1
