"""Write the golden files of this format version (files that exist already are never rewritten).

    python format/golden/generate.py

Each file stores the same small synthetic cache (2 layers, 2 KV heads, 500 tokens, head_dim 16) with one codec;
`expected.json` records the SHA-256 of every decoded array, so tests/format/test_golden.py fails if a reader change
stops decoding them exactly as this version did. Files of format 1.2: dense raw/zstd, pruned zstd, quantized rans, zstd
and raw-minmax. Of 1.3: dense bfloat16, and a quantized file exercising what the reference writer does not emit
(keys stored without RoPE with their frequencies, bfloat16 exact rows, per-channel rANS tables on lanes of 100 rows,
layer tables on lanes of the maximum 4096 rows, 4 value groups). Of 1.5: a pruned file with a logit bias on every
layer (raw), and a quantized rANS file with one on layer 0 only (zstd). Of 1.6, with `cache.windows`: a dense zstd
file whose layer 1 has a sliding window of 128 (it holds positions 373 … 499) and layer 0 none, and a quantized rANS
file whose layer 0 has a window of 200 and keeps all 199 positions it holds (no exact rows: the sinks are outside
it), layer 1 none and pruned as the other files.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from kvc_format import KvcReader, KvcWriter, Stream, encode_positions, rans
from kvc_format.constants import MAJOR_VERSION, MINOR_VERSION
from kvc_format.quantized import Quantization, encode_layer, lane_layout, n_tables, to_lanes

HERE = Path(__file__).parent
LAYERS, HEADS, TOKENS, DIM = 2, 2, 500, 16


def header(layout: str, kept: int | None = None, **cache) -> dict:
    """The header of a golden file; `cache` adds or replaces `cache` keys."""
    geometry = {"layout": layout, "layers": LAYERS, "kv_heads": HEADS, "tokens": TOKENS, "head_dim": DIM,
                "computed_dtype": "float32", **cache}
    if kept is not None:
        geometry["kept"] = kept
    return {"kvc": {"writer": "format/golden/generate.py"}, "model": {"name": "golden"}, "cache": geometry,
            "prompt": {"prefix_ids": list(range(TOKENS)), "question_prefix": "Q: ", "question_suffix": "\nA:",
                       "template": "plain"}}


def cache() -> tuple[list[np.ndarray], list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(2026)
    scale = rng.uniform(0.5, 1.5, DIM).astype(np.float32)
    keys = [(rng.standard_normal((HEADS, TOKENS, DIM)) * scale).astype(np.float32) for _ in range(LAYERS)]
    values = [rng.laplace(0, 1, (HEADS, TOKENS, DIM)).astype(np.float32) for _ in range(LAYERS)]
    positions = [[np.sort(rng.choice(TOKENS, TOKENS // 2 + 7 * h + 13 * layer, replace=False))
                  for h in range(HEADS)] for layer in range(LAYERS)]
    for per_head in positions:  # keep the sinks, as kvc does
        for h, p in enumerate(per_head):
            per_head[h] = np.union1d(p, np.arange(4))
    return keys, values, positions


def stream(name: str, dtype: str, array: np.ndarray, codec: str | None = None) -> Stream:
    data = np.ascontiguousarray(array)
    return Stream(name, dtype, data.shape, data.tobytes(), codec=codec)


def writer(name: str, head: dict) -> KvcWriter | None:
    """A writer for a golden file not written yet, or None."""
    path = HERE / name
    return None if path.exists() else KvcWriter(path, head)


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def recode(streams: list, name: str, rows_q: np.ndarray, alphabet: int, lane_rows: int, tables: str) -> list:
    """Re-encode one symbol stream with rANS on the given lanes and table granularity (and its table stream)."""
    by_name = {s.name: s for s in streams}
    symbols = np.frombuffer(by_name[name].data, np.uint8).reshape(by_name[name].shape)
    dim = symbols.shape[1]
    flat = to_lanes(symbols, rows_q)
    lengths, table_ids = lane_layout(rows_q, dim, lane_rows, tables)
    freq = rans.quantize_frequencies(rans.histograms(flat, lengths, table_ids, n_tables(tables, len(rows_q), dim),
                                                     alphabet))
    payload = rans.encode(flat, lengths, table_ids, freq)
    table_name = name.replace("symbols", "tables")
    by_name[name] = Stream(name, "uint8", symbols.shape, by_name[name].data, codec="rans",
                           encoded=(payload, {"lane_rows": lane_rows, "tables": tables}))
    by_name[table_name] = stream(table_name, "uint16", freq.astype("<u2"))
    return [by_name[s.name] for s in streams]


def with_exact_bfloat16(streams: list, keys: np.ndarray, values: np.ndarray, exact: np.ndarray) -> list:
    swap = {"exact_keys": keys[exact], "exact_values": values[exact]}
    return [stream(s.name, "bfloat16", bfloat16_bits(swap[s.name])) if s.name in swap else s for s in streams]


INV_FREQ = [float(np.float32(10000.0 ** (-2 * i / DIM))) for i in range(DIM // 2)]


def write_1_3(keys, values, positions, kept) -> None:
    w = writer("dense-bfloat16-zstd.kvc", header("dense"))
    if w is not None:
        with w:
            for i in range(LAYERS):
                w.add_section("kv_layer", {"layer": i}, [stream("keys", "bfloat16", bfloat16_bits(keys[i])),
                                                         stream("values", "bfloat16", bfloat16_bits(values[i]))],
                              codec="zstd")
    w = writer("quantized-rope-channel.kvc",
               header("quantized", kept, exact_positions=4, key_rope="removed", rope_inv_freq=INV_FREQ))
    if w is None:
        return
    q = Quantization(coder="raw", value_group=4, exact_positions=4)
    with w:
        for i in range(LAYERS):
            k = np.concatenate([keys[i][h, p] for h, p in enumerate(positions[i])])
            v = np.concatenate([values[i][h, p] for h, p in enumerate(positions[i])])
            encoded = encode_layer(k, v, positions[i], q)
            exact = np.concatenate([p < 4 for p in positions[i]])
            rows_q = np.array([int((p >= 4).sum()) for p in positions[i]], np.int64)
            streams = recode(encoded.streams, "key_symbols", rows_q, 256, 100, "channel")
            streams = recode(streams, "value_symbols", rows_q, 256, 4096, "layer")
            streams = with_exact_bfloat16(streams, k, v, exact)
            w.add_section("kv_layer_quantized", {"layer": i, **encoded.attrs}, streams, codec="zstd")


def add_pruned_layer(w: KvcWriter, i: int, keys, values, positions, codec: str) -> int:
    """Layer i's kv_layer_pruned section (float16 keys and values in `codec`); its kept count."""
    counts, gaps = encode_positions(positions[i])
    k = np.concatenate([keys[i][h, p] for h, p in enumerate(positions[i])]).astype("<f2")
    v = np.concatenate([values[i][h, p] for h, p in enumerate(positions[i])]).astype("<f2")
    w.add_section("kv_layer_pruned", {"layer": i, "kept": len(gaps)},
                  [stream("counts", "int32", counts, "zstd"), stream("positions", "int32", gaps, "zstd"),
                   stream("keys", "float16", k), stream("values", "float16", v)], codec=codec)
    return len(gaps)


def bias(layer: int, kept: int) -> np.ndarray:
    """A logit bias per kept row, within the ±ln 100 the reference writer's fit allows."""
    return np.random.default_rng(1500 + layer).uniform(-4.6, 4.6, kept).astype("<f2")


def write_1_5(keys, values, positions, kept) -> None:
    w = writer("pruned-bias.kvc", header("pruned", kept))
    if w is not None:
        with w:
            for i in range(LAYERS):
                kept_here = add_pruned_layer(w, i, keys, values, positions, "raw")
                w.add_section("kv_layer_bias", {"layer": i}, [stream("bias", "float16", bias(i, kept_here))],
                              codec="raw")
    w = writer("quantized-rans-bias.kvc", header("quantized", kept, exact_positions=4, key_rope="applied"))
    if w is None:
        return
    with w:
        for i in range(LAYERS):
            k = np.concatenate([keys[i][h, p] for h, p in enumerate(positions[i])])
            v = np.concatenate([values[i][h, p] for h, p in enumerate(positions[i])])
            encoded = encode_layer(k, v, positions[i], Quantization(coder="rans", value_group=DIM))
            w.add_section("kv_layer_quantized", {"layer": i, **encoded.attrs}, encoded.streams, codec="zstd")
            if i == 0:
                w.add_section("kv_layer_bias", {"layer": i}, [stream("bias", "float16", bias(i, len(k)))],
                              codec="zstd")


DENSE_WINDOWS = [None, 128]
QUANTIZED_WINDOWS = [200, None]


def first_position(window: int | None) -> int:
    """The first position a layer of this window stores (SPEC.md §3)."""
    return 0 if window is None else max(0, TOKENS - (window - 1))


def write_1_6(keys, values, positions) -> None:
    w = writer("dense-windows-zstd.kvc", header("dense", windows=DENSE_WINDOWS))
    if w is not None:
        with w:
            for i, window in enumerate(DENSE_WINDOWS):
                held = slice(first_position(window), TOKENS)
                w.add_section("kv_layer", {"layer": i}, [stream("keys", "float16", keys[i][:, held].astype("<f2")),
                                                         stream("values", "float16",
                                                                values[i][:, held].astype("<f2"))],
                              codec="zstd")
    # Layer 0 keeps every position its window holds (the model's own cache, quantized), layer 1 its pruned subset.
    kept_positions = [[np.arange(first_position(QUANTIZED_WINDOWS[0]), TOKENS)] * HEADS, positions[1]]
    kept = sum(len(p) for per_head in kept_positions for p in per_head)
    w = writer("quantized-windows-rans.kvc", header("quantized", kept, exact_positions=4, key_rope="applied",
                                                    windows=QUANTIZED_WINDOWS))
    if w is None:
        return
    with w:
        for i, per_head in enumerate(kept_positions):
            k = np.concatenate([keys[i][h, p] for h, p in enumerate(per_head)])
            v = np.concatenate([values[i][h, p] for h, p in enumerate(per_head)])
            encoded = encode_layer(k, v, per_head, Quantization(coder="rans", value_group=DIM))
            w.add_section("kv_layer_quantized", {"layer": i, **encoded.attrs}, encoded.streams, codec="zstd")


def write_all() -> None:
    keys, values, positions = cache()
    kept = sum(len(p) for per_head in positions for p in per_head)
    write_1_3(keys, values, positions, kept)
    write_1_5(keys, values, positions, kept)
    write_1_6(keys, values, positions)
    if (HERE / "dense-raw.kvc").exists():  # the 1.2 files
        return
    for codec in ("raw", "zstd"):
        with KvcWriter(HERE / f"dense-{codec}.kvc", header("dense")) as w:
            for i in range(LAYERS):
                w.add_section("kv_layer", {"layer": i}, [stream("keys", "float16", keys[i].astype("<f2")),
                                                         stream("values", "float16", values[i].astype("<f2"))],
                              codec=codec)
    with KvcWriter(HERE / "pruned-zstd.kvc", header("pruned", kept)) as w:
        for i in range(LAYERS):
            add_pruned_layer(w, i, keys, values, positions, "zstd")
    variants = {"quantized-rans": Quantization(coder="rans", value_group=DIM),
                "quantized-zstd": Quantization(coder="zstd", value_group=DIM),
                "quantized-raw-minmax": Quantization(coder="raw", value_mode="minmax", value_bits=3, value_group=4)}
    for name, q in variants.items():
        with KvcWriter(HERE / f"{name}.kvc", header("quantized", kept, exact_positions=4, key_rope="applied")) as w:
            for i in range(LAYERS):
                k = np.concatenate([keys[i][h, p] for h, p in enumerate(positions[i])])
                v = np.concatenate([values[i][h, p] for h, p in enumerate(positions[i])])
                encoded = encode_layer(k, v, positions[i], q)
                w.add_section("kv_layer_quantized", {"layer": i, **encoded.attrs}, encoded.streams, codec="zstd")


def digests(path: Path) -> dict:
    """SHA-256 of each layer's decoded keys, values (float32 or stored dtype bytes) and positions."""
    with KvcReader(path) as r:
        r.verify()
        out = {"version": list(r.version), "layers": []}
        for stored in r.read_layers():
            layer = {"keys": hashlib.sha256(stored.keys.data.tobytes()).hexdigest(),
                     "values": hashlib.sha256(stored.values.data.tobytes()).hexdigest()}
            if stored.positions is not None:
                positions = np.concatenate(stored.positions).astype("<i8").tobytes()
                layer["positions"] = hashlib.sha256(positions).hexdigest()
            bias = r.read_bias(len(out["layers"]))
            if bias is not None:
                layer["bias"] = hashlib.sha256(bias.tobytes()).hexdigest()
            out["layers"].append(layer)
        return out


if __name__ == "__main__":
    write_all()
    expected_path = HERE / "expected.json"
    expected = json.loads(expected_path.read_text()) if expected_path.exists() else {}
    for path in sorted(HERE.glob("*.kvc")):
        expected.setdefault(path.name, digests(path))  # never overwrite an earlier version's record
    expected_path.write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print(f"format {MAJOR_VERSION}.{MINOR_VERSION}: {len(expected)} golden files recorded in {expected_path}")
