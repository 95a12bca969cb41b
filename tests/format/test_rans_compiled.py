"""The compiled rANS step loop (numba) against the numpy one: bit-identical symbols and the same errors on good,
corrupt and golden payloads; test_rans.py runs its whole suite under each of them as well."""

import os

import numpy as np
import pytest

from kvc_format import CodecError, KvcReader, rans

from attacks import GOLDEN
from rans_data import coded

if rans._compiled() is None:
    if os.environ.get("CI"):
        raise RuntimeError("numba is missing: the compiled rANS decoder cannot be tested")
    pytest.skip("numba is not installed", allow_module_level=True)


# ------------------------------------------------------------------------------------ the two decoders agree


def _both(monkeypatch, decode):
    """decode() under each decoder: its result, or its error's type and message."""
    outcomes = []
    for name in ("numpy", "compiled"):
        monkeypatch.setenv("KVC_RANS_DECODER", name)
        try:
            outcomes.append(decode())
        except CodecError as error:
            outcomes.append((type(error), str(error)))
    return outcomes


def test_decoders_agree_on_good_and_corrupt_payloads(monkeypatch):
    """Bit-identical symbols, and the same error for every corruption (truncation, flipped bits, a bad final
    state, words left over), lane for lane."""
    rng = np.random.default_rng(5)
    for trial in range(30):
        symbols, lengths, tables, freq = coded(rng, int(rng.integers(1, 60)), 200, 5, 256 if trial % 2 else 9,
                                               lengths=None)
        payload = bytearray(rans.encode(symbols, lengths, tables, freq))
        variants = [bytes(payload), bytes(payload[:-2]), bytes(payload) + b"\1\0"]
        for _ in range(4):
            bad = bytearray(payload)
            bad[int(rng.integers(0, len(bad)))] ^= 1 << int(rng.integers(0, 8))
            variants.append(bytes(bad))
        for variant in variants:
            numpy_out, compiled_out = _both(monkeypatch, lambda v=variant, a=lengths, b=tables, f=freq:
                                                     rans.decode(v, a, b, f))
            if isinstance(numpy_out, np.ndarray):
                assert isinstance(compiled_out, np.ndarray) and np.array_equal(numpy_out, compiled_out)
            else:
                assert numpy_out == compiled_out


def test_decoders_agree_on_every_golden_file(monkeypatch):
    for path in sorted(GOLDEN.glob("*.kvc")):
        def layers(path=path):
            with KvcReader(path) as reader:
                return [(s.keys.data.copy(), s.values.data.copy()) for _, s in reader.iter_layers()]
        numpy_layers, compiled_layers = _both(monkeypatch, layers)
        for a, b in zip(numpy_layers, compiled_layers, strict=True):
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), path.name


def test_unknown_decoder_is_refused(monkeypatch):
    monkeypatch.setenv("KVC_RANS_DECODER", "fortran")
    with pytest.raises(CodecError, match="KVC_RANS_DECODER"):
        rans.decoder()


def test_decoders_agree_on_batches_with_several_corrupt_items(monkeypatch):
    """The compiled loop decodes each item on its own (in parallel); it must still raise the error the numpy loop,
    which steps all items together, meets first."""
    rng = np.random.default_rng(9)
    items = []
    for _ in range(6):
        symbols, lengths, tables, freq = coded(rng, int(rng.integers(1, 30)), 150, 3, 9, lengths=None)
        items.append((rans.encode(symbols, lengths, tables, freq), lengths, tables, freq))
    for trial in range(40):
        batch = list(items)
        for k in rng.choice(len(batch), size=int(rng.integers(1, 4)), replace=False):
            payload = bytearray(batch[k][0])
            if trial % 3 == 0:
                payload = payload[:-2]
            else:
                payload[int(rng.integers(0, len(payload)))] ^= 1 << int(rng.integers(0, 8))
            batch[k] = (bytes(payload), *batch[k][1:])
        numpy_out, compiled_out = _both(monkeypatch, lambda b=batch: rans.decode_many(b))
        if isinstance(numpy_out, list):
            assert all(np.array_equal(a, b) for a, b in zip(numpy_out, compiled_out, strict=True))
        else:
            assert numpy_out == compiled_out


def test_dequantizers_agree_with_rope_tables_on_every_golden_file(monkeypatch):
    """Layers read with RoPE tables (the compiled dequantizer rotates as it writes, numpy after) are identical, and
    equal to the torch-free `apply_rope` of the keys read without tables (to float32 rounding of the angles)."""
    from kvc_format import apply_rope

    for path in sorted(GOLDEN.glob("quantized-*.kvc")):
        with KvcReader(path) as reader:
            g = reader.geometry
            freqs = np.asarray(g.rope_inv_freq or [1e-2, 1e-3], dtype=np.float32)
            angles = np.arange(g.tokens, dtype=np.float32)[:, None] * freqs[None]
            rope = (np.cos(angles), np.sin(angles))

        def layers(path=path, rope=rope):
            with KvcReader(path) as reader:
                return [(s.keys.data.copy(), s.values.data.copy()) for s in reader.read_layers(rope=rope)]
        numpy_layers, compiled_layers = _both(monkeypatch, layers)
        for a, b in zip(numpy_layers, compiled_layers, strict=True):
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), path.name
        with KvcReader(path) as reader:
            plain = reader.read_layers()
        for got, stored in zip(numpy_layers, plain, strict=True):
            want = stored.keys.data
            if g.key_rope == "removed":
                want = apply_rope(want, np.concatenate(stored.positions), freqs)
            np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5, err_msg=path.name)


def _layer_arrays(rows: int, dim: int, key_step: float) -> dict:
    rng = np.random.default_rng(2)
    return {"key_symbols": rng.integers(0, 256, (rows, dim)).astype(np.uint8),
            "value_symbols": rng.integers(0, 256, (rows, dim)).astype(np.uint8),
            "key_zero": np.zeros((1, dim), np.float32), "key_step": np.full((1, dim), key_step, np.float32),
            "value_zero": np.zeros((0, 1), np.float16), "value_step": np.ones((rows, 1), np.float16),
            "value_tables": np.zeros((0, 256), np.uint16), "exact_keys": np.zeros((0, dim), np.float16),
            "exact_values": np.zeros((0, dim), np.float16)}


def test_dequantizers_refuse_overflow_alike(monkeypatch):
    """Steps that overflow float32 are refused with the same error by both dequantizers, not returned as inf."""
    from kvc_format import MetadataError, quantized

    arrays = _layer_arrays(6, 4, 3e38)
    outcomes = []
    for name in ("numpy", "compiled"):
        monkeypatch.setenv("KVC_RANS_DECODER", name)
        with pytest.raises(MetadataError) as error:
            quantized.decode_layer(arrays, {}, np.zeros(6, bool), np.array([6]))
        outcomes.append(str(error.value))
    assert outcomes[0] == outcomes[1] and "non-finite" in outcomes[0]


def test_compiled_dequantizer_checks_shapes_itself(monkeypatch):
    """The kernel does not check bounds, so a layer whose streams disagree with its rows is refused before it."""
    from kvc_format import MetadataError, quantized

    monkeypatch.setenv("KVC_RANS_DECODER", "compiled")
    arrays = _layer_arrays(6, 4, 0.1)
    arrays["value_step"] = np.ones((2, 1), np.float16)  # 2 rows of steps for 6 rows of symbols
    with pytest.raises(MetadataError, match="do not match its rows"):
        quantized.decode_layer(arrays, {}, np.zeros(6, bool), np.array([6]))
