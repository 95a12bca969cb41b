"""Assemble `.kvc` bytes by hand, straight from SPEC.md, so tests can craft valid and hostile files.

Deliberately independent of kvc_format's writer (it only uses msgpack, zlib and struct).
"""

import struct
import zlib

import msgpack
import numpy as np

MAGIC = b"\x89KVC\r\n\x1a\n"
END = b"KVCINDEX"


def align(n: int) -> int:
    return -(-n // 64) * 64


def header_dict(layers=2, kv_heads=2, tokens=5, head_dim=4, kept=None) -> dict:
    """A header for a dense cache, or for a pruned one keeping `kept` entries in all when `kept` is given."""
    cache = {"layout": "dense", "layers": layers, "kv_heads": kv_heads, "tokens": tokens, "head_dim": head_dim,
             "computed_dtype": "float16"}
    if kept is not None:
        cache.update(layout="pruned", kept=kept)
    return {
        "model": {"name": "test"},
        "cache": cache,
        "prompt": {"prefix_ids": list(range(tokens)), "question_prefix": "", "question_suffix": "",
                   "template": "plain"},
        "settings": {"ratio": 1.0, "bits": 16, "codec": "raw"},
    }


def raw_streams(arrays: list[tuple[str, str, np.ndarray]]) -> tuple[list[dict], bytes]:
    """Raw stream entries for (name, dtype, array) triples, in order, and the section payload they cover."""
    entries, payload = [], b""
    for name, dtype, array in arrays:
        data = array.tobytes()
        entries.append({"name": name, "codec": "raw", "params": {}, "dtype": dtype, "shape": list(array.shape),
                        "offset": len(payload), "length": len(data), "decoded_length": len(data)})
        payload += data
    return entries, payload


def raw_layer(layer: int, kv_heads=2, tokens=5, head_dim=4, seed=0) -> tuple[dict, bytes]:
    """A kv_layer section entry (offset and crc filled in by `assemble`) and its raw float16 payload."""
    rng = np.random.default_rng(seed + layer)
    shape = [kv_heads, tokens, head_dim]
    streams, payload = raw_streams([("keys", "float16", rng.standard_normal(shape).astype("<f2")),
                                    ("values", "float16", rng.standard_normal(shape).astype("<f2"))])
    return {"type": "kv_layer", "required": True, "layer": layer, "streams": streams}, payload


def pruned_layer(layer: int, counts: list[int], gaps: list[int], head_dim=4, seed=0) -> tuple[dict, bytes]:
    """A kv_layer_pruned section entry and its raw payload, from counts and gaps written as given (SPEC.md §4)."""
    rng = np.random.default_rng(seed + layer)
    shape = [len(gaps), head_dim]
    streams, payload = raw_streams([("counts", "int32", np.array(counts, dtype="<i4")),
                                    ("positions", "int32", np.array(gaps, dtype="<i4")),
                                    ("keys", "float16", rng.standard_normal(shape).astype("<f2")),
                                    ("values", "float16", rng.standard_normal(shape).astype("<f2"))])
    entry = {"type": "kv_layer_pruned", "required": True, "layer": layer, "kept": len(gaps), "streams": streams}
    return entry, payload


def assemble(header, sections, *, major=1, minor=0, order=b"L", index=None, header_crc=None,
             index_crc=None, section_crc=None) -> bytes:
    """header: dict or raw bytes; sections: [(entry, payload)]; index: raw bytes to use instead of built."""
    hb = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    out = bytearray(MAGIC + struct.pack("<HH", major, minor) + order + b"\0\0\0")
    out += struct.pack("<II", len(hb), zlib.crc32(hb) if header_crc is None else header_crc) + hb
    entries = []
    for entry, payload in sections:
        out += b"\0" * (align(len(out)) - len(out))
        crc = zlib.crc32(payload) if section_crc is None else section_crc
        entries.append({**entry, "offset": len(out), "length": len(payload), "crc32": crc})
        out += payload
    ib = index if index is not None else msgpack.packb({"sections": entries}, use_bin_type=True)
    out += b"\0" * (align(len(out)) - len(out))
    offset = len(out)
    out += ib
    out += struct.pack("<QII", offset, len(ib), zlib.crc32(ib) if index_crc is None else index_crc) + END
    return bytes(out)


def valid_file(layers=2, **geometry) -> bytes:
    return assemble(header_dict(layers=layers, **geometry), [raw_layer(i, **geometry) for i in range(layers)])


# A pruned cache of 2 layers × 2 KV heads × 5 tokens, as (counts, gaps) per layer, and the positions they code:
# layer 0 keeps head 0 at [0, 2, 4] (gaps 0, 1, 1) and head 1 at [3] (gap 3); layer 1 keeps [1] and [0, 1].
PRUNED = [([3, 1], [0, 1, 1, 3]), ([1, 2], [1, 0, 0])]
PRUNED_POSITIONS = [([0, 2, 4], [3]), ([1], [0, 1])]


def valid_pruned_file(layers=PRUNED) -> bytes:
    """A pruned file with the given (counts, gaps) per layer, on a 2-head, 5-token cache."""
    kept = sum(len(gaps) for _, gaps in layers)
    sections = [pruned_layer(i, counts, gaps) for i, (counts, gaps) in enumerate(layers)]
    return assemble(header_dict(layers=len(layers), kept=kept), sections, minor=1)
