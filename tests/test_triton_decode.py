"""The Triton decoder (kvzip_cli.load.kernels) against kvc_format's numpy decoder: symbol for symbol, float for float.

Triton runs here on the CPU under its interpreter (conftest.py sets TRITON_INTERPRET=1), which checks the kernels'
logic; how fast they are on a GPU is measured by examples/gpu_check.py. Skipped where Triton is not installed.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from kvc_format import KvcReader, rans
from kvc_format.errors import CodecError
from kvzip_cli import KvcError, load
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.settings import QuantOptions
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.load.kernels import rans_decode
from kvzip_cli.load.kernels.layers import DeviceChecks, decode_layers
from kvzip_cli.load.loader import choose_decoder
from kvzip_cli.prune.scoring import score_context

from attacks import GOLDEN, edited, replace_payload, stream
from fixtures import TEXT

CPU = torch.device("cpu")
QUANTIZED_GOLDEN = ["quantized-rans.kvc", "quantized-rope-channel.kvc", "quantized-zstd.kvc",
                    "quantized-raw-minmax.kvc"]


def random_item(rng: np.random.Generator, lanes: int, longest: int, alphabet: int, n_tables: int):
    lengths = rng.integers(0, longest + 1, lanes)
    tables = rng.integers(0, n_tables, lanes)
    skew = rng.dirichlet(np.full(alphabet, 0.3), n_tables)
    counts = (skew * 1000).astype(np.int64) + (rng.random((n_tables, alphabet)) < 0.5)
    freq = rans.quantize_frequencies(counts)
    drawn = [rng.choice(alphabet, n, p=freq[t] / rans.PROB_SCALE) for n, t in zip(lengths, tables, strict=True)]
    symbols = np.concatenate(drawn or [np.zeros(0, np.int64)]).astype(np.uint8)
    return rans.encode(symbols, lengths, tables, freq), lengths, tables, freq


def kernel_decode(items) -> tuple[np.ndarray, rans_decode.DecodeStatus]:
    """Every item's symbols in lane order (one lane after another), as kvc_format's decode_many lays them out."""
    batch = rans.prepare_batch(items)
    out = torch.empty(int(batch.item_symbols.sum()), dtype=torch.uint8)
    lane_out = np.cumsum(batch.lengths) - batch.lengths
    status = rans_decode.decode(batch, lane_out, np.ones(len(items), np.int64), out)
    return out.numpy(), status


def test_random_payloads_decode_like_numpy():
    """Mixed alphabets and table counts, empty lanes, and an item of more lanes than one pass takes."""
    rng = np.random.default_rng(7)
    items = [random_item(rng, 37, 40, 256, 5), random_item(rng, 1, 300, 2, 1),
             random_item(rng, rans_decode.LANES_PER_PASS + 300, 3, 16, 3), random_item(rng, 0, 1, 8, 1),
             random_item(rng, 64, 12, 200, 64)]
    got, status = kernel_decode(items)
    status.check()
    assert np.array_equal(got, np.concatenate(rans.decode_many(items)))


@pytest.mark.parametrize("damage", ["truncated", "extra word", "flipped word"])
def test_corrupt_payloads_are_refused_like_numpy(damage):
    rng = np.random.default_rng(3)
    payload, lengths, tables, freq = random_item(rng, 20, 50, 64, 2)
    head = 4 * lengths.size
    if damage == "truncated":
        payload = payload[:-2]
    elif damage == "extra word":
        payload = payload + b"\x01\x02"
    else:
        payload = payload[:head + 10] + bytes([payload[head + 10] ^ 0x5A]) + payload[head + 11 :]
    item = (payload, lengths, tables, freq)
    with pytest.raises(CodecError):
        rans.decode_many([item])
    with pytest.raises(CodecError):
        kernel_decode([item])[1].check()


def device_layers(path):
    with KvcReader(path) as r:
        checks = DeviceChecks()
        got = decode_layers(r.read_undecoded(), r.geometry.head_dim, CPU, checks)
        checks.raise_if_bad()
        return got, r.read_layers()


@pytest.mark.parametrize("name", QUANTIZED_GOLDEN)
def test_golden_files_decode_exactly(name):
    """rANS (layer and per-channel tables, 100- and 4096-row lanes), zstd and raw symbols, minmax and uniform
    values, bfloat16 and float16 exact rows: the same float32 keys and values as the numpy reader."""
    got, want = device_layers(GOLDEN / name)
    for (keys, values), stored in zip(got, want, strict=True):
        assert np.array_equal(keys.numpy(), stored.keys.data)
        assert np.array_equal(values.numpy(), stored.values.data)


def test_corrupt_section_fails_on_the_device(tmp_path):
    """A payload with a flipped word inside a section whose checksum is valid: caught by the kernel's checks."""
    def edit(header, sections):
        entry, data = sections[0]
        s = stream(sections, 0, "key_symbols")
        payload = bytearray(data[s["offset"] : s["offset"] + s["length"]])
        payload[-3] ^= 0xFF
        replace_payload(sections, 0, "key_symbols", bytes(payload))

    path = tmp_path / "bad.kvc"
    path.write_bytes(edited("quantized-rans.kvc", edit))
    with pytest.raises(CodecError):
        device_layers(path)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def prefilled(request, tiny_tokenizer):
    from fixtures import tiny_model

    return prefill_document(TEXT, tiny_model(request.param, tiny_tokenizer), chunk_size=128)


@pytest.mark.parametrize("pre_rope", [True, False])
def test_load_with_triton_gives_the_numpy_cache(tmp_path, prefilled, pre_rope):
    pre = prefilled
    path = tmp_path / "pq.kvc"
    pruning = score_context(pre.lm, pre.cache, pre.layout, "kvzip").keep(0.5)
    write_kvc(pre, path, codec="ans", bits=3, pruning=pruning, quant=QuantOptions(pre_rope=pre_rope))
    numpy_kv = load(path, pre.lm, decoder="numpy")
    triton_kv = load(path, pre.lm, decoder="triton")
    assert (numpy_kv.decoder, triton_kv.decoder) == ("numpy", "triton")
    for a, b in zip(numpy_kv.cache.layers, triton_kv.cache.layers, strict=True):
        for x, y in zip(a.context_keys + a.context_values, b.context_keys + b.context_values, strict=True):
            assert torch.equal(x, y)


def test_decoder_choice(monkeypatch):
    assert choose_decoder("auto", CPU) == "numpy"
    assert choose_decoder("triton", CPU) == "triton"  # interpreted here
    with pytest.raises(KvcError, match="unknown decoder"):
        choose_decoder("cuda", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KvcError, match="runs on CUDA devices"):
        choose_decoder("triton", CPU)
