"""Write the golden files of this format version (run once per version; never regenerate an older version's files).

    python format/golden/generate.py

Each file stores the same small synthetic cache (2 layers, 2 KV heads, 500 tokens, head_dim 16) with one codec;
`expected.json` records the SHA-256 of every decoded array, so tests/test_golden.py fails if a reader change stops
decoding them exactly as this version did.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from kvc_format import KvcReader, KvcWriter, Stream, encode_positions
from kvc_format.constants import MAJOR_VERSION, MINOR_VERSION
from kvc_format.quantized import Quantization, encode_layer

HERE = Path(__file__).parent
LAYERS, HEADS, TOKENS, DIM = 2, 2, 500, 16


def header(layout: str, kept: int | None = None, **cache) -> dict:
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


def write_all() -> None:
    keys, values, positions = cache()
    for codec in ("raw", "zstd"):
        with KvcWriter(HERE / f"dense-{codec}.kvc", header("dense")) as w:
            for i in range(LAYERS):
                w.add_section("kv_layer", {"layer": i}, [stream("keys", "float16", keys[i].astype("<f2")),
                                                         stream("values", "float16", values[i].astype("<f2"))],
                              codec=codec)
    kept = sum(len(p) for per_head in positions for p in per_head)
    with KvcWriter(HERE / "pruned-zstd.kvc", header("pruned", kept)) as w:
        for i in range(LAYERS):
            counts, gaps = encode_positions(positions[i])
            k = np.concatenate([keys[i][h, p] for h, p in enumerate(positions[i])]).astype("<f2")
            v = np.concatenate([values[i][h, p] for h, p in enumerate(positions[i])]).astype("<f2")
            w.add_section("kv_layer_pruned", {"layer": i, "kept": len(gaps)},
                          [stream("counts", "int32", counts, "zstd"), stream("positions", "int32", gaps, "zstd"),
                           stream("keys", "float16", k), stream("values", "float16", v)], codec="zstd")
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
