"""Hypothesis round trips over random geometries and writer settings, for every layout: what the writer stores, the
reference reader, the spec-only reader and the export all decode identically (quantized: exactly what the
quantizer gives in memory)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc_format import KvcReader, KvcWriter, Stream, apply_rope, encode_positions, load_file
from kvc_format.quantized import Quantization, encode_layer
from kvc_format.scalar_quantizers import (
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
    quantize_values_uniform,
)

from kvc_bytes import header_dict
from spec_reader import read_file

FLOATS = {"float32": "<f4", "float16": "<f2"}


def first_position(window: int | None, tokens: int) -> int:
    """SPEC.md §3: a layer of window W stores positions tokens − (W − 1) … tokens − 1 (all of them without one)."""
    return 0 if window is None else max(0, tokens - (window - 1))


@st.composite
def caches(draw):
    """(layers, heads, tokens, dim, per-layer (keys (heads, held, dim), values, per-head kept positions), windows):
    `windows` is None, or per layer None or a sliding window (1.6), which leaves the layer positions first … tokens − 1
    (keys and values hold those, row t position first + t)."""
    layers, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    tokens, dim = draw(st.integers(1, 300)), draw(st.sampled_from([2, 4, 8, 16, 64]))
    windows = draw(st.none() | st.lists(st.none() | st.integers(2, tokens + 2), min_size=layers, max_size=layers))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    keep = draw(st.floats(0.05, 1.0))
    content = []
    for layer in range(layers):
        first = first_position(None if windows is None else windows[layer], tokens)
        held = tokens - first
        scale = rng.uniform(0.05, 4, dim).astype(np.float32)
        keys = (rng.standard_normal((heads, held, dim)) * scale).astype(np.float32)
        values = rng.laplace(0, 1, (heads, held, dim)).astype(np.float32)
        positions = [first + np.sort(rng.choice(held, max(1, int(keep * held)), replace=False)) for _ in range(heads)]
        content.append((keys, values, positions))
    return layers, heads, tokens, dim, content, windows


def with_windows(header: dict, windows: list | None) -> dict:
    if windows is not None:
        header["cache"]["windows"] = windows
    return header


def rows(array: np.ndarray, positions: list[np.ndarray], tokens: int) -> np.ndarray:
    """The kept rows of `array` (heads, held, dim), whose last row is position tokens − 1."""
    first = tokens - array.shape[1]
    return np.concatenate([array[h, p - first] for h, p in enumerate(positions)])


@settings(max_examples=40, deadline=None)
@given(cache=caches(), dtype=st.sampled_from(["float32", "float16"]), codec=st.sampled_from(["raw", "zstd"]),
       pruned=st.booleans())
def test_float_layouts_round_trip_exactly(tmp_path_factory, cache, dtype, codec, pruned):
    layers, heads, tokens, dim, content, windows = cache
    kept = sum(len(p) for _, _, per_head in content for p in per_head)
    header = with_windows(header_dict(layers=layers, kv_heads=heads, tokens=tokens, head_dim=dim,
                                      kept=kept if pruned else None), windows)
    path = tmp_path_factory.mktemp("rt") / "x.kvc"
    stored = []
    with KvcWriter(path, header) as w:
        for i, (k, v, positions) in enumerate(content):
            if pruned:
                k, v = rows(k, positions, tokens), rows(v, positions, tokens)
            k, v = k.astype(FLOATS[dtype]), v.astype(FLOATS[dtype])
            streams = [Stream("keys", dtype, k.shape, k.tobytes()), Stream("values", dtype, v.shape, v.tobytes())]
            if pruned:
                counts, gaps = encode_positions(positions)
                streams = [Stream("counts", "int32", counts.shape, counts.tobytes()),
                           Stream("positions", "int32", gaps.shape, gaps.tobytes()), *streams]
            w.add_section("kv_layer_pruned" if pruned else "kv_layer", {"layer": i, "kept": len(k)}, streams, codec)
            stored.append((k, v))
    with KvcReader(path) as r:
        r.verify()
        decoded = r.read_layers()
    for (k, v), (_, _, positions), layer in zip(stored, content, decoded, strict=True):
        np.testing.assert_array_equal(layer.keys.data, k)
        np.testing.assert_array_equal(layer.values.data, v)
        if pruned:
            assert [list(p) for p in layer.positions] == [list(p) for p in positions]
    spec = read_file(path)
    for mine, layer in zip(spec.layers, decoded, strict=True):
        np.testing.assert_array_equal(mine.keys, layer.keys.data.astype(np.float32))
    exported = load_file(path)
    assert len(exported) == 3 * layers * heads
    for i, (k, _, positions) in enumerate(content):
        for h in range(heads):
            want = positions[h] if pruned else np.arange(tokens - k.shape[1], tokens)
            np.testing.assert_array_equal(exported[f"layers.{i}.heads.{h}.positions"], want)


@settings(max_examples=40, deadline=None)
@given(cache=caches(), mode=st.sampled_from(["uniform", "minmax"]), bits=st.sampled_from([2, 3, 4, 8]),
       value_step=st.floats(0.02, 2.0), key_step=st.floats(0.02, 2.0), group=st.sampled_from([1, 2, 4, 64]),
       exact_positions=st.integers(0, 8), coder=st.sampled_from(["rans", "zstd", "raw"]), rope=st.booleans())
def test_quantized_layout_round_trips_the_quantizer(tmp_path_factory, cache, mode, bits, value_step, key_step, group,
                                                     exact_positions, coder, rope):
    layers, heads, tokens, dim, content, windows = cache
    group, exact_positions = min(group, dim), min(exact_positions, tokens)
    q = Quantization(value_mode=mode, value_bits=bits, value_step=value_step, value_group=group, key_step=key_step,
                     exact_positions=exact_positions, coder=coder)
    kept = sum(len(p) for _, _, per_head in content for p in per_head)
    header = with_windows(header_dict(layers=layers, kv_heads=heads, tokens=tokens, head_dim=dim, kept=kept), windows)
    header["cache"].update(layout="quantized", exact_positions=exact_positions,
                           key_rope="removed" if rope else "applied")
    inv_freq = [float(np.float32(10000.0 ** (-2 * i / dim))) for i in range(dim // 2)]
    if rope:
        header["cache"]["rope_inv_freq"] = inv_freq
    path = tmp_path_factory.mktemp("rt") / "q.kvc"
    with KvcWriter(path, header) as w:
        for i, (k, v, positions) in enumerate(content):
            encoded = encode_layer(rows(k, positions, tokens), rows(v, positions, tokens), positions, q)
            w.add_section("kv_layer_quantized", {"layer": i, **encoded.attrs}, encoded.streams, codec="zstd")
    with KvcReader(path) as r:
        r.verify()
        decoded = r.read_layers()
    exported = load_file(path)
    spec = read_file(path)
    for i, ((k, v, positions), layer, mine) in enumerate(zip(content, decoded, spec.layers, strict=True)):
        k, v = rows(k, positions, tokens), rows(v, positions, tokens)
        exact = np.concatenate([p < exact_positions for p in positions])
        rows_q = np.array([(p >= exact_positions).sum() for p in positions])
        np.testing.assert_array_equal(layer.keys.data[exact], k[exact].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(layer.keys.data[~exact],
                                      dequantize_keys(quantize_keys(k[~exact], rows_q, key_step), rows_q))
        code = (quantize_values_uniform(v[~exact], value_step, group) if mode == "uniform"
                else quantize_values(v[~exact], bits, group))
        np.testing.assert_array_equal(layer.values.data[~exact], dequantize_values(code))
        np.testing.assert_array_equal(mine.keys, layer.keys.data)
        np.testing.assert_array_equal(mine.values, layer.values.data)
        all_positions = np.concatenate(positions)
        want_keys = apply_rope(layer.keys.data, all_positions, inv_freq) if rope else layer.keys.data
        ends = np.cumsum([len(p) for p in positions])
        for h in range(heads):
            start = ends[h] - len(positions[h])
            np.testing.assert_array_equal(exported[f"layers.{i}.heads.{h}.keys"], want_keys[start : ends[h]])
            np.testing.assert_array_equal(exported[f"layers.{i}.heads.{h}.values"], layer.values.data[start : ends[h]])
