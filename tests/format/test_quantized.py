"""Quantized layout (format 1.2): quantizer error bounds, codec round trips, rANS size, hostile sections."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc_format import CodecError, KvcReader, KvcWriter, MetadataError, codecs, rans
from kvc_format.constants import DTYPES, MINOR_VERSION
from kvc_format.quantized import LANE_ROWS, Quantization, encode_layer, encode_symbols, lane_layout, to_lanes
from kvc_format.scalar_quantizers import (
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
    quantize_values_uniform,
)

from kvc_bytes import assemble, header_dict

HEADS, DIM, TOKENS = 2, 8, 600


def kv_rows(rng, rows: int, dim: int = DIM, outliers: bool = True) -> np.ndarray:
    x = rng.standard_normal((rows, dim)).astype(np.float32) * rng.uniform(0.1, 3, dim).astype(np.float32)
    if outliers and rows:
        x[rng.integers(0, rows), rng.integers(0, dim)] *= 40
    return x


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(0, 70), min_size=1, max_size=4), dim=st.sampled_from([2, 8, 64]),
       step=st.floats(0.01, 2.0), seed=st.integers(0, 10_000))
def test_key_error_is_within_half_a_step(rows, dim, step, seed):
    rows_per_head = np.array(rows)
    keys = kv_rows(np.random.default_rng(seed), int(rows_per_head.sum()), dim)
    code = quantize_keys(keys, rows_per_head, step)
    heads = np.repeat(np.arange(len(rows)), rows)
    error = np.abs(dequantize_keys(code, rows_per_head) - keys)
    bound = code.step[heads] * 0.5 + 1e-5 * (1 + np.abs(keys))
    assert (error <= bound).all()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 50), bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([1, 4, 16, 64]),
       seed=st.integers(0, 10_000))
def test_value_error_is_within_half_a_step(rows, bits, group, seed):
    values = kv_rows(np.random.default_rng(seed), rows, 64)
    code = quantize_values(values, bits, group)
    assert code.symbols.max(initial=0) < 1 << bits
    step = np.repeat(code.step.astype(np.float32), group, axis=1)
    zero = np.repeat(code.zero.astype(np.float32), group, axis=1)
    error = np.abs(dequantize_values(code) - values)
    # float16 zero points and steps round the grid: allow their rounding on top of half a step.
    bound = 0.5 * step + np.abs(zero) * 2**-10 + step * (1 << bits) * 2**-10 + 1e-6
    assert (error <= bound).all()


def write_quantized(path, layers: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]], q: Quantization,
                    windows: list | None = None) -> None:
    kept = sum(len(np.concatenate(p)) for _, _, p in layers)
    header = header_dict(layers=len(layers), kv_heads=HEADS, tokens=TOKENS, head_dim=DIM, kept=kept)
    header["cache"].update(layout="quantized", exact_positions=q.exact_positions, key_rope="applied")
    if windows is not None:
        header["cache"]["windows"] = windows
    with KvcWriter(path, header) as w:
        for i, (k, v, positions) in enumerate(layers):
            encoded = encode_layer(k, v, positions, q)
            w.add_section("kv_layer_quantized", {"layer": i, **encoded.attrs}, encoded.streams, codec="zstd")


def random_layers(seed: int, n_layers: int = 2, dim: int = DIM) -> list[tuple[np.ndarray, np.ndarray, list]]:
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(n_layers):
        positions = [np.sort(rng.choice(TOKENS, rng.integers(TOKENS // 2, TOKENS + 1), replace=False))
                     for _ in range(HEADS)]
        n = sum(len(p) for p in positions)
        layers.append((kv_rows(rng, n, dim), kv_rows(rng, n, dim), positions))
    return layers


@pytest.mark.parametrize("coder", ["rans", "zstd", "raw"])
@pytest.mark.parametrize(("mode", "bits"), [("uniform", 4), ("minmax", 2), ("minmax", 3), ("minmax", 4),
                                            ("minmax", 8)])
def test_file_round_trip_reproduces_the_quantizer(tmp_path, coder, mode, bits):
    """Through the file, every layer decodes to exactly what quantize → dequantize gives in memory, sink rows to
    their float16 values, positions exactly."""
    q = Quantization(value_mode=mode, value_bits=bits, value_step=0.4, value_group=4, key_step=0.2,
                     exact_positions=3, coder=coder)
    layers = random_layers(bits)
    write_quantized(tmp_path / "q.kvc", layers, q)
    with KvcReader(tmp_path / "q.kvc") as r:
        assert r.version == (1, MINOR_VERSION) and r.geometry.layout == "quantized"
        r.verify()
        for (k, v, positions), stored in zip(layers, r.read_layers(), strict=True):
            assert [list(p) for p in stored.positions] == [list(p) for p in positions]
            exact = np.concatenate([p < 3 for p in positions])
            rows_q = np.array([(p >= 3).sum() for p in positions])
            np.testing.assert_array_equal(stored.keys.data[exact], k[exact].astype(np.float16))
            np.testing.assert_array_equal(stored.values.data[exact], v[exact].astype(np.float16))
            want_k = dequantize_keys(quantize_keys(k[~exact], rows_q, 0.2), rows_q)
            code = quantize_values_uniform(v[~exact], 0.4, 4) if mode == "uniform" else quantize_values(
                v[~exact], bits, 4)
            np.testing.assert_array_equal(stored.keys.data[~exact], want_k)
            np.testing.assert_array_equal(stored.values.data[~exact], dequantize_values(code))


def test_windowed_layers_round_trip_unpruned(tmp_path):
    """Format 1.6: layer 0 has a window of 100 and keeps the 99 positions it holds (none of them an exact sink row),
    layer 1 none; an unpruned windowed cache keeps kv_heads × Σ held entries."""
    rng = np.random.default_rng(5)
    held = [np.arange(TOKENS - 99, TOKENS), np.arange(TOKENS)]
    layers = [(kv_rows(rng, HEADS * len(p)), kv_rows(rng, HEADS * len(p)), [p] * HEADS) for p in held]
    q = Quantization(value_group=4, exact_positions=3)
    write_quantized(tmp_path / "w.kvc", layers, q, windows=[100, None])
    with KvcReader(tmp_path / "w.kvc") as r:
        r.verify()
        g = r.geometry
        assert [g.first_position(layer) for layer in range(2)] == [TOKENS - 99, 0]
        assert sum(r.kept_per_layer()) == r.header["cache"]["kept"] == g.held_entries == HEADS * (99 + TOKENS)
        assert [s.attrs["exact"] for s in r.sections] == [0, HEADS * 3]
        for (k, v, positions), stored in zip(layers, r.read_layers(), strict=True):
            assert [list(p) for p in stored.positions] == [list(p) for p in positions]
            exact = np.concatenate([p < 3 for p in positions])
            rows_q = np.array([(p >= 3).sum() for p in positions])
            np.testing.assert_array_equal(stored.keys.data[~exact],
                                          dequantize_keys(quantize_keys(k[~exact], rows_q, q.key_step), rows_q))
            np.testing.assert_array_equal(stored.values.data[~exact],
                                          dequantize_values(quantize_values_uniform(v[~exact], q.value_step, 4)))


def test_minmax_step_is_never_negative():
    """A group whose minimum rounds up in float16 past its maximum still gets a step >= 0 (found by the spec-only
    reader: the reference reader refuses negative steps)."""
    values = np.array([[1.0006, 1.0007, 1.0006, 1.0007]] * 3, np.float32)
    code = quantize_values(values, 2, 4)
    assert (code.step >= 0).all() and (code.zero.astype(np.float32) <= values.min()).all()
    assert np.abs(dequantize_values(code) - values).max() < 1e-3


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 50), step=st.floats(0.05, 4.0), group=st.sampled_from([1, 4, 16, 64]),
       seed=st.integers(0, 10_000))
def test_uniform_value_error_is_within_half_a_step(rows, step, group, seed):
    values = kv_rows(np.random.default_rng(seed), rows, 64)
    code = quantize_values_uniform(values, step, group)
    assert code.zero.shape == (0, 64 // group)
    steps = np.repeat(code.step.astype(np.float32), group, axis=1)
    error = np.abs(dequantize_values(code) - values)
    assert (error <= 0.5 * steps * (1 + 1e-6) + 1e-7).all()


def test_entropy_coding_is_lossless_on_symbols(tmp_path):
    """rans, zstd and raw store the same symbols: the decoded caches are identical to the bit."""
    layers = random_layers(7)
    decoded = {}
    for coder in ("rans", "zstd", "raw"):
        path = tmp_path / f"{coder}.kvc"
        write_quantized(path, layers, Quantization(coder=coder, value_group=8))
        with KvcReader(path) as r:
            decoded[coder] = [(s.keys.data.copy(), s.values.data.copy()) for s in r.read_layers()]
    for coder in ("zstd", "raw"):
        for a, b in zip(decoded["rans"], decoded[coder], strict=True):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_rans_payload_is_close_to_the_symbols_entropy():
    """Coded size within 2% of the empirical entropy per table, plus 4 bytes of state per lane."""
    rng = np.random.default_rng(0)
    rows_per_head = np.array([3000, 2500])
    symbols = np.clip(np.rint(rng.laplace(8, 1.5, (rows_per_head.sum(), 16))), 0, 15).astype(np.uint8)
    lengths, tables = lane_layout(rows_per_head, 16, LANE_ROWS, "channel")
    flat = to_lanes(symbols, rows_per_head)
    hist = rans.histograms(flat, lengths, tables, 32, 16)
    payload = rans.encode(flat, lengths, tables, rans.quantize_frequencies(hist))
    p = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    entropy_bytes = -(hist[hist > 0] * np.log2(p[hist > 0])).sum() / 8
    assert len(payload) <= 1.02 * entropy_bytes + 4 * len(lengths) + 2
    assert len(payload) >= entropy_bytes  # nothing can beat the entropy


def test_rans_beats_zstd_on_quantized_symbols():
    """Same symbols (Laplace-distributed, 3,000 rows × 64 channels), tables and lane states included."""
    rng = np.random.default_rng(0)
    rows_per_head = np.array([1600, 1400])
    spread = rng.uniform(0.5, 4, 64)
    symbols = np.clip(np.rint(rng.laplace(128, spread, (3000, 64))), 0, 255).astype(np.uint8)
    codec, (payload, params), tables = encode_symbols(symbols, rows_per_head, 256, "rans")
    zstd_bytes = len(codecs.encode("zstd", symbols.tobytes(), 1)[0])
    table_bytes = len(codecs.encode("zstd", tables.tobytes(), 2)[0])
    assert codec == "rans" and params["tables"] == "channel"
    assert len(payload) + table_bytes < 0.9 * zstd_bytes


def test_tiny_streams_fall_back_to_zstd():
    """A handful of rows: lane states would cost more than they save, so the writer keeps zstd."""
    symbols = np.random.default_rng(0).integers(0, 16, (6, 64)).astype(np.uint8)
    codec, _, tables = encode_symbols(symbols, np.array([3, 3]), 16, "rans")
    assert codec == "zstd" and tables.shape == (0, 16)


# --- hostile sections: rebuild a valid file with one thing changed, CRCs recomputed so only the check under test
# can catch it.


def _sections(path):
    with KvcReader(path) as r:
        header = r.header
        out = []
        for s in r.sections:
            r._file.seek(s.offset)
            payload = r._file.read(s.length)
            streams = [{f.name: getattr(st, f.name) for f in dataclasses.fields(st)} for st in s.streams]
            for st in streams:
                st["shape"] = list(st["shape"])
            out.append(({"type": s.type, "required": s.required, **s.attrs, "streams": streams}, payload))
    return header, out


def _rebuilt(tmp_path, mutate) -> str:
    src = tmp_path / "valid.kvc"
    write_quantized(src, random_layers(1), Quantization(value_group=4))
    header, sections = _sections(src)
    mutate(header, sections)
    return _assembled(tmp_path, header, sections)


def _assembled(tmp_path, header, sections) -> str:
    for entry, _ in sections:  # keep streams contiguous after a payload change
        offset = 0
        for stream in entry["streams"]:
            stream["offset"], offset = offset, offset + stream["length"]
    out = tmp_path / "bad.kvc"
    out.write_bytes(assemble(header, sections, minor=2))
    return str(out)


def _stream(sections, layer, name):
    entry, _ = sections[layer]
    return next(st for st in entry["streams"] if st["name"] == name)


def _patch_payload(sections, layer, name, change):
    entry, payload = sections[layer]
    st = _stream(sections, layer, name)
    blob = bytearray(payload[st["offset"] : st["offset"] + st["length"]])
    blob = change(blob)
    new = payload[: st["offset"]] + bytes(blob) + payload[st["offset"] + st["length"] :]
    st["length"] = len(blob)
    sections[layer] = (entry, new)


def _read_all(path):
    with KvcReader(path) as r:
        r.read_layers()


def test_valid_rebuild_reads(tmp_path):
    def check(header, sections):
        for layer in range(len(sections)):
            assert {_stream(sections, layer, n)["codec"] for n in ("key_symbols", "value_symbols")} == {"rans"}
    _read_all(_rebuilt(tmp_path, check))


@pytest.mark.parametrize("change", [lambda b: b[:-2], lambda b: b + b"\0\0", lambda b: b[:-1]],
                         ids=["truncated", "extended", "odd"])
def test_rans_stream_length_changes_fail_cleanly(tmp_path, change):
    path = _rebuilt(tmp_path, lambda h, s: _patch_payload(s, 0, "key_symbols", change))
    with pytest.raises(CodecError):
        _read_all(path)


def test_rans_bit_flips_fail_cleanly(tmp_path):
    rng = np.random.default_rng(0)
    caught = 0
    for trial in range(20):
        def flip(blob, trial=trial):
            bit = int(rng.integers(0, 8 * len(blob)))
            blob[bit // 8] ^= 1 << (bit % 8)
            return blob
        path = _rebuilt(tmp_path, lambda h, s, flip=flip: _patch_payload(s, 1, "value_symbols", flip))
        try:
            _read_all(path)
        except CodecError:
            caught += 1
    assert caught >= 19


@pytest.mark.parametrize(("name", "key", "value", "error", "match"), [
    ("key_symbols", "params", {"lane_rows": 1 << 20, "tables": "channel"}, MetadataError, "lane_rows"),
    ("key_symbols", "params", {"lane_rows": 1024, "tables": "token"}, MetadataError, "granularity"),
    ("key_tables", "codec", "rans", CodecError, "only symbol streams"),
])
def test_bad_rans_parameters(tmp_path, name, key, value, error, match):
    def mutate(header, sections):
        _stream(sections, 0, name)[key] = value
    with pytest.raises(error, match=match):
        _read_all(_rebuilt(tmp_path, mutate))


def test_table_count_must_match_granularity(tmp_path):
    def mutate(header, sections):
        params = _stream(sections, 0, "key_symbols")["params"]
        params["tables"] = "layer" if params["tables"] != "layer" else "channel"
    with pytest.raises(MetadataError, match="tables for granularity"):
        _read_all(_rebuilt(tmp_path, mutate))


def test_tables_without_rans_are_refused(tmp_path):
    def mutate(header, sections):
        _stream(sections, 0, "key_symbols")["codec"] = "raw"
    with pytest.raises(MetadataError, match="rows exactly when"):
        _read_all(_rebuilt(tmp_path, mutate))


def _rewrite_raw(sections, layer, name, change):
    """Decode one stream, let `change` edit the array in place, store it back with the raw codec."""
    entry, payload = sections[layer]
    st = _stream(sections, layer, name)
    data = codecs.decode(st["codec"], memoryview(payload)[st["offset"] : st["offset"] + st["length"]],
                         st["decoded_length"], st["params"])
    array = data.view(DTYPES[st["dtype"]]).copy()
    change(array)
    _patch_payload(sections, layer, name, lambda _: bytearray(array.tobytes()))
    st.update(codec="raw", params={})


def test_table_rows_must_sum_to_m(tmp_path):
    def mutate(header, sections):
        _rewrite_raw(sections, 0, "value_tables", lambda a: a.__setitem__(0, a[0] + 1))
    with pytest.raises(CodecError, match="sum"):
        _read_all(_rebuilt(tmp_path, mutate))


def test_exact_row_count_must_match_positions(tmp_path):
    def mutate(header, sections):
        entry, _ = sections[0]
        entry["exact"] -= 1
        for name in ("exact_keys", "exact_values"):
            _stream(sections, 0, name)["shape"][0] -= 1
        for name in ("key_symbols", "value_symbols", "value_zero", "value_step"):
            _stream(sections, 0, name)["shape"][0] += 1
    with pytest.raises((MetadataError, CodecError)):
        _read_all(_rebuilt(tmp_path, mutate))


def test_value_group_must_divide_head_dim(tmp_path):
    def mutate(header, sections):
        for name in ("value_zero", "value_step"):
            st = _stream(sections, 0, name)
            st["shape"][1] = 3
            st["decoded_length"] = st["shape"][0] * 3 * 2
    with pytest.raises(MetadataError, match="divide head_dim"):
        _read_all(_rebuilt(tmp_path, mutate))


def test_uniform_values_need_the_full_alphabet(tmp_path):
    def mutate(header, sections):
        for layer in (0, 1):
            _stream(sections, layer, "value_tables")["shape"][1] = 16
            _stream(sections, layer, "value_tables")["decoded_length"] //= 16
    with pytest.raises(MetadataError, match="alphabet of 256"):
        _read_all(_rebuilt(tmp_path, mutate))


def test_quantized_layout_needs_its_header_keys(tmp_path):
    def mutate(header, sections):
        header["cache"]["key_rope"] = "sideways"
    with pytest.raises(MetadataError, match="key_rope"):
        _read_all(_rebuilt(tmp_path, mutate))


def test_non_finite_key_steps_are_refused(tmp_path):
    def mutate(header, sections):
        _rewrite_raw(sections, 0, "key_step", lambda a: a.__setitem__(0, np.inf))
    with pytest.raises(MetadataError, match="finite"):
        _read_all(_rebuilt(tmp_path, mutate))


def test_value_symbols_beyond_the_alphabet_are_refused(tmp_path):
    src = tmp_path / "zstd.kvc"
    write_quantized(src, random_layers(1), Quantization(value_mode="minmax", value_group=4, coder="zstd",
                                                        value_bits=2))
    header, sections = _sections(src)
    _rewrite_raw(sections, 0, "value_symbols", lambda a: a.__setitem__(0, 7))
    with pytest.raises(MetadataError, match="alphabet"):
        _read_all(_assembled(tmp_path, header, sections))
