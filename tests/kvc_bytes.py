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


def header_dict(layers=2, kv_heads=2, tokens=5, head_dim=4) -> dict:
    return {
        "model": {"name": "test"},
        "cache": {"layout": "dense", "layers": layers, "kv_heads": kv_heads, "tokens": tokens,
                  "head_dim": head_dim, "computed_dtype": "float16"},
        "prompt": {"prefix_ids": list(range(tokens)), "question_prefix": "", "question_suffix": "",
                   "template": "plain"},
        "settings": {"ratio": 1.0, "bits": 16, "codec": "raw"},
    }


def raw_layer(layer: int, kv_heads=2, tokens=5, head_dim=4, seed=0) -> tuple[dict, bytes]:
    """A kv_layer section entry (offset and crc filled in by `assemble`) and its raw float16 payload."""
    rng = np.random.default_rng(seed + layer)
    shape = [kv_heads, tokens, head_dim]
    k = rng.standard_normal(shape).astype("<f2").tobytes()
    v = rng.standard_normal(shape).astype("<f2").tobytes()
    streams = [
        {"name": "keys", "codec": "raw", "params": {}, "dtype": "float16", "shape": shape, "offset": 0,
         "length": len(k), "decoded_length": len(k)},
        {"name": "values", "codec": "raw", "params": {}, "dtype": "float16", "shape": shape, "offset": len(k),
         "length": len(v), "decoded_length": len(v)},
    ]
    return {"type": "kv_layer", "required": True, "layer": layer, "streams": streams}, k + v


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
