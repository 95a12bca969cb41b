"""Mutation fuzzer for the `.kvc` reader (`kvc_format.KvcReader`).

Every input is a mutated golden file (format/golden/*.kvc). A worker subprocess writes it to disk, opens it,
verifies it and decodes every layer batch: the reader must succeed or raise a `KvcFormatError` subclass. Anything
else is a failure: another exception (MemoryError included: the worker's address space is capped at its size plus
--memory-mb), a crash of the worker, a hang past --timeout seconds, or success on an input a mutator made invalid for
certain (duplicate msgpack keys, extension types, non-string keys, non-zero padding or reserved bytes, trailing
bytes). Failing inputs are saved to --save-dir (at most SAVE_PER_SIGNATURE per distinct signature) with a `.txt`
holding the seed, the mutations and the traceback.

Mutations: byte-level stacks (bit flips, boundary bytes, truncation, extension, inserted/deleted runs, splices from
another golden file, boundary integers over u32/u64 fields) and structure-aware ones that rebuild the file with
correct lengths, offsets and CRCs so the input reaches the deep code: random fields of the header and index msgpack
(values, types, lists, maps), msgpack quirks, section payload bytes, decoded stream values (counts, gaps, steps,
tables...), rANS states, codec and shape changes, dropped/duplicated/spliced sections, geometry edits (sliding windows
included: the 1.6 golden files are among the seeds).

    python tests/format/fuzzing.py --seconds 600 --seed 1 --save-dir /tmp/fuzz-finds
    python tests/format/fuzzing.py --replay /tmp/fuzz-finds/exception-s1-i123.kvc

Input i of seed s is generated from its own `random.Random(f"{s}/{i}")`: a run is deterministic given its seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import zstandard

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "format" / "golden"
SAVE_PER_SIGNATURE = 20
FOOTER = 24
ALIGN = 64
PREFIX = 24  # preamble + header_length + header_crc32

BOUNDARY_BYTES = (0x00, 0xFF, 0x7F, 0x80)
BOUNDARY_INTS = (0, 1, -1, 2, 3, 4, 7, 8, 63, 64, 65, 255, 256, 1023, 1024, 1025, 4095, 4096, 4097, 65535, 65536,
                 1 << 24, (1 << 24) + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**34, 2**63 - 1, 2**64 - 1, -(2**31),
                 -(2**63))
BOUNDARY_FIELD_INTS = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1)
WORDS = ("", "x", "dense", "pruned", "quantized", "kv_layer", "kv_layer_pruned", "kv_layer_quantized", "raw", "zstd",
         "rans", "lz4", "float32", "float16", "bfloat16", "uint8", "uint16", "int32", "int64", "float64", "applied",
         "removed", "channel", "head", "layer", "counts", "positions", "keys", "values", "exact_keys",
         "exact_values", "key_zero", "key_step", "key_symbols", "key_tables", "value_zero", "value_step",
         "value_symbols", "value_tables", "sections", "\u00e9\u0000", "a" * 300)
KEYS = ("cache", "prompt", "model", "layout", "layers", "kv_heads", "tokens", "head_dim", "kept", "exact",
        "exact_positions", "key_rope", "prefix_ids", "question_prefix", "question_suffix", "sections", "type",
        "required", "offset", "length", "crc32", "streams", "layer", "name", "codec", "params", "dtype", "shape",
        "decoded_length", "shuffle", "lane_rows", "tables", "windows", "unknown")
ODD_VALUES = (True, False, None, 0.5, -0.0, math.nan, math.inf, "", "7", b"\x00\x01", [], {}, [0], {"x": 1},
              2**64 - 1, -1)
FLOAT_SPECIALS = (0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, 6.1e-5, 65504.0, 1e30, -1.0, 1.0)


# ------------------------------------------------------------------------------------------------ golden files


@dataclass
class Doc:
    """A `.kvc` file taken apart: rebuilt by `assemble` with consistent lengths, offsets and CRCs."""

    preamble: bytearray
    header: object
    index: dict
    payloads: list[bytearray]

    @property
    def entries(self) -> list:
        return self.index["sections"]


@dataclass(frozen=True)
class Golden:
    name: str
    data: bytes
    doc: Doc


def parse(data: bytes) -> Doc:
    header_length = struct.unpack_from("<I", data, 16)[0]
    header = msgpack.unpackb(data[PREFIX : PREFIX + header_length], raw=False)
    index_offset, index_length = struct.unpack_from("<QI", data, len(data) - FOOTER)
    index = msgpack.unpackb(data[index_offset : index_offset + index_length], raw=False)
    payloads = [bytearray(data[e["offset"] : e["offset"] + e["length"]]) for e in index["sections"]]
    return Doc(bytearray(data[:16]), header, index, payloads)


def load_goldens(directory: Path = GOLDEN_DIR) -> list[Golden]:
    goldens = []
    for path in sorted(directory.glob("*.kvc")):
        data = path.read_bytes()
        goldens.append(Golden(path.name, data, parse(data)))
    if not goldens:
        raise SystemExit(f"no golden .kvc files in {directory}")
    return goldens


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout_sections(doc: Doc, header_end: int) -> None:
    """Set each section entry's offset, length and crc32 from its payload (entries that are not maps are left)."""
    position = header_end
    for entry, payload in zip(doc.entries, doc.payloads, strict=True):
        position = _align(position)
        if isinstance(entry, dict):
            entry.update(offset=position, length=len(payload), crc32=zlib.crc32(payload))
        position += len(payload)


def assemble(preamble: bytes, header: bytes, payloads: list[bytearray], index: bytes) -> tuple[bytearray, list]:
    """(file bytes, the (start, end) of every non-empty zero padding gap)."""
    out = bytearray(preamble)
    out += struct.pack("<II", len(header), zlib.crc32(header)) + header
    gaps = []
    for payload in [*payloads, index]:
        gaps.append((len(out), _align(len(out))))
        out += bytes(_align(len(out)) - len(out)) + payload
    index_offset = len(out) - len(index)
    out += struct.pack("<QII", index_offset, len(index), zlib.crc32(index)) + b"KVCINDEX"
    return out, [(a, b) for a, b in gaps if b > a]


# ------------------------------------------------------------------------------------------------ msgpack


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + struct.pack(">H", n) if n < 1 << 16 else b"\xdf" + struct.pack(">I", n)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + struct.pack(">H", n) if n < 1 << 16 else b"\xdd" + struct.pack(">I", n)


def _packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


QUIRKS = ("duplicate", "int_key", "bytes_key", "ext", "timestamp")


def pack_quirky(obj, target: int, quirk: str, rng: random.Random) -> bytes:
    """msgpack of `obj`, by hand, with one invalid entry added to the map whose id() is `target`."""
    if isinstance(obj, dict):
        items = [(_packb(k), pack_quirky(v, target, quirk, rng)) for k, v in obj.items()]
        if id(obj) == target:
            if quirk == "duplicate":
                if not items:
                    items.append((_packb("x"), _packb(1)))
                key, value = rng.choice(items)
                items.insert(rng.randrange(len(items) + 1), (key, rng.choice((value, _packb(0), _packb("x")))))
            elif quirk == "int_key":
                items.append((_packb(7), _packb(1)))
            elif quirk == "bytes_key":
                items.append((_packb(b"name"), _packb(1)))
            elif quirk == "ext":
                items.append((_packb("x"), _packb(msgpack.ExtType(rng.randrange(128), b"\x01\x02"))))
            else:
                items.append((_packb("x"), _packb(msgpack.Timestamp(1, 0))))
        return _map_header(len(items)) + b"".join(k + v for k, v in items)
    if isinstance(obj, list):
        return _array_header(len(obj)) + b"".join(pack_quirky(v, target, quirk, rng) for v in obj)
    return _packb(obj)


def _maps(obj) -> list:
    out = []
    if isinstance(obj, dict):
        out.append(obj)
        for v in obj.values():
            out += _maps(v)
    elif isinstance(obj, list) and not (obj and not isinstance(obj[0], dict | list)):
        for v in obj:
            out += _maps(v)
    return out


def pack_doc(obj, rng: random.Random, notes: list[str], what: str) -> tuple[bytes, str]:
    """(msgpack bytes, why they are invalid for certain or ""). Usually plain; sometimes quirky or malformed."""
    r = rng.random()
    if r < 0.92 or not isinstance(obj, dict):
        return _packb(obj), ""
    if r < 0.97:
        quirk = rng.choice(QUIRKS)
        target = rng.choice(_maps(obj))
        notes.append(f"{what}: msgpack {quirk}")
        return pack_quirky(obj, id(target), quirk, rng), f"msgpack {quirk}"
    data = _packb(obj)
    kind = rng.choice(("trailing", "two maps", "array", "truncated"))
    notes.append(f"{what}: msgpack {kind}")
    why = f"msgpack {kind}"
    if kind == "trailing":
        return data + _packb(rng.choice((0, None, "x"))), why
    if kind == "two maps":
        return data + data, why
    if kind == "array":
        return _packb([obj]), why
    return data[: rng.randrange(len(data))], why


# ------------------------------------------------------------------------------------------------ tree mutations


def _nodes(obj, path=()) -> list[tuple]:
    """(path, ...) of every value under obj; long lists of scalars contribute themselves and a few elements."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(path + (k,))
            out += _nodes(v, path + (k,))
    elif isinstance(obj, list):
        indices = range(len(obj))
        if len(obj) > 16 and not isinstance(obj[0], dict | list):
            indices = (0, 1, len(obj) // 2, len(obj) - 1)
        for i in indices:
            out.append(path + (i,))
            out += _nodes(obj[i], path + (i,))
    return out


def _get(obj, path: tuple):
    for p in path:
        obj = obj[p]
    return obj


def _new_int(value: int, rng: random.Random) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.choice(BOUNDARY_INTS)
    if r < 0.8:
        return value + rng.choice((-1, 1))
    return rng.choice((value * 2, value // 2, -value, rng.randrange(-5, 5000)))


def _new_value(value, rng: random.Random):
    if rng.random() < 0.2:
        return copy.deepcopy(rng.choice(ODD_VALUES))
    if type(value) is bool:
        return rng.choice((not value, 0, 1, None))
    if isinstance(value, int):
        return max(-(2**63), min(2**64 - 1, _new_int(value, rng)))
    if isinstance(value, str):
        return rng.choice(WORDS)
    if isinstance(value, float):
        return rng.choice(FLOAT_SPECIALS)
    if isinstance(value, list):
        return _new_list(value, rng)
    if isinstance(value, dict):
        return _new_map(value, rng)
    return copy.deepcopy(rng.choice(ODD_VALUES))


def _new_list(value: list, rng: random.Random) -> list:
    value = list(value)
    op = rng.choice(("shorten", "extend", "swap", "empty", "drop", "reverse"))
    if op == "shorten" and value:
        return value[: rng.randrange(len(value))]
    if op == "extend":
        extra = copy.deepcopy(rng.choice(value)) if value else 0
        return value + [extra] * rng.choice((1, 1, 2, 9))
    if op == "swap" and len(value) > 1:
        i, j = rng.sample(range(len(value)), 2)
        value[i], value[j] = value[j], value[i]
        return value
    if op == "drop" and value:
        del value[rng.randrange(len(value))]
        return value
    if op == "reverse":
        return value[::-1]
    return []


def _new_map(value: dict, rng: random.Random) -> dict:
    value = dict(value)
    op = rng.choice(("remove", "add", "rename", "clear"))
    if op == "remove" and value:
        del value[rng.choice(list(value))]
    elif op == "add":
        value[rng.choice(KEYS)] = copy.deepcopy(rng.choice(ODD_VALUES + BOUNDARY_INTS[:12] + WORDS[:8]))
    elif op == "rename" and value:
        key = rng.choice(list(value))
        value[rng.choice(KEYS)] = value.pop(key)
    elif op == "clear":
        value = {}
    return value


def mutate_tree(obj, rng: random.Random, notes: list[str], what: str) -> None:
    """Change one random field deep in a msgpack map, in place."""
    nodes = _nodes(obj)
    if not nodes:
        return
    path = rng.choice(nodes)
    parent, key = _get(obj, path[:-1]), path[-1]
    if isinstance(parent, dict) and rng.random() < 0.08:
        del parent[key]
        notes.append(f"{what}{list(path)}: removed")
        return
    parent[key] = _new_value(parent[key], rng)
    notes.append(f"{what}{list(path)} = {_short(parent[key])}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------ stream payloads


DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "uint8": "u1", "uint16": "<u2", "int32": "<i4"}


def _streams(doc: Doc) -> list[tuple[int, int]]:
    return [(i, j) for i, e in enumerate(doc.entries) for j in range(len(e["streams"]))]


def _stream_bytes(doc: Doc, i: int, j: int) -> bytearray:
    s = doc.entries[i]["streams"][j]
    return doc.payloads[i][s["offset"] : s["offset"] + s["length"]]


def _set_stream_bytes(doc: Doc, i: int, j: int, data: bytes) -> None:
    """Replace one stream's payload and shift the following streams so the section stays consistent."""
    streams = doc.entries[i]["streams"]
    s = streams[j]
    payload = doc.payloads[i]
    payload[s["offset"] : s["offset"] + s["length"]] = data
    s["length"] = len(data)
    position = 0
    for st in streams:
        st["offset"] = position
        position += st["length"]


def _decode(stream: dict, data: bytes) -> bytes | None:
    """The element bytes of a raw or zstd stream (None for rans, or when it does not decode)."""
    if stream["codec"] == "raw":
        return bytes(data)
    if stream["codec"] != "zstd":
        return None
    try:  # an earlier mutation may have broken the frame, or made it declare a huge size
        if zstandard.get_frame_parameters(bytes(data)).content_size != stream["decoded_length"]:
            return None
        plain = zstandard.ZstdDecompressor().decompress(bytes(data))
    except zstandard.ZstdError:
        return None
    size = stream["params"]["shuffle"]
    return np.frombuffer(plain, np.uint8).reshape(size, -1).T.tobytes() if size > 1 else plain


def _encode(codec: str, shuffle: int, data: bytes) -> tuple[bytes, dict]:
    if codec == "raw":
        return data, {}
    planes = np.frombuffer(data, np.uint8).reshape(-1, shuffle).T.tobytes() if shuffle > 1 else data
    return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(planes), {"shuffle": shuffle}


def _reencode(doc: Doc, i: int, j: int, plain: bytes, codec: str | None = None, shuffle: int | None = None) -> None:
    s = doc.entries[i]["streams"][j]
    codec = codec or s["codec"]
    shuffle = shuffle or s["params"].get("shuffle", np.dtype(DTYPES[s["dtype"]]).itemsize)
    payload, params = _encode(codec, shuffle, plain)
    s["codec"], s["params"] = codec, params
    _set_stream_bytes(doc, i, j, payload)


def _mutate_values(array: np.ndarray, rng: random.Random) -> str:
    """Change a few elements of a decoded stream to values its checks care about."""
    n = rng.choice((1, 1, 2, 5))
    kind = array.dtype.kind
    at = [rng.randrange(array.size) for _ in range(n)]
    if kind == "f":
        picks = [rng.choice(FLOAT_SPECIALS) for _ in at]
    elif array.dtype == np.uint16 and rng.random() < 0.5 and array.size > 1:
        # tables: move frequency mass so the row sum holds (zeros appear) or break it by one
        a, b = at[0], rng.randrange(array.size)
        amount = int(array[a]) if rng.random() < 0.5 else 1
        array[a] -= min(amount, int(array[a]))
        if rng.random() < 0.8:
            array[b] = min(65535, int(array[b]) + amount)
        return f"moved {amount} from {a} to {b}"
    else:
        info = np.iinfo(array.dtype)
        choices = [v for v in (0, 1, -1, 2, 3, 4, 15, 16, 255, 256, 499, 500, 501, 4096, 65535, info.max, info.min)
                   if info.min <= v <= info.max]
        picks = [rng.choice(choices) for _ in at]
    with np.errstate(over="ignore"):  # float16 takes 1e30 as inf: fine
        for a, v in zip(at, picks, strict=True):
            array[a] = v
    return f"elements {at} = {picks}"


def mutate_stream_values(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    i, j = rng.choice(_streams(doc))
    s = doc.entries[i]["streams"][j]
    plain = _decode(s, _stream_bytes(doc, i, j))
    if not plain:
        return mutate_rans_payload(doc, rng, notes) if s["codec"] == "rans" else None
    array = np.frombuffer(plain, DTYPES[s["dtype"]]).copy()
    what = _mutate_values(array, rng)
    _reencode(doc, i, j, array.tobytes())
    notes.append(f"section {i} {s['name']}: {what}")


def mutate_rans_payload(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    coded = [(i, j) for i, j in _streams(doc) if doc.entries[i]["streams"][j]["codec"] == "rans"]
    if not coded:
        return
    i, j = rng.choice(coded)
    data = bytearray(_stream_bytes(doc, i, j))
    op = rng.choice(("state", "state", "word", "drop words", "add words"))
    if op == "state" and len(data) >= 4:
        at = 4 * rng.randrange(min(len(data) // 4, 64))
        value = rng.choice((0, 1, 0xFFFF, 0x10000, 0x10001, 0xFFFFFFFF, rng.getrandbits(32)))
        data[at : at + 4] = struct.pack("<I", value)
    elif op == "word" and len(data) >= 2:
        at = rng.randrange(len(data) - 1)
        data[at : at + 2] = struct.pack("<H", rng.choice((0, 0xFFFF, rng.getrandbits(16))))
    elif op == "drop words":
        del data[len(data) - rng.choice((1, 2, 4, 6)) :]
    else:
        data += bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 2, 4))))
    _set_stream_bytes(doc, i, j, data)
    notes.append(f"section {i} rans {doc.entries[i]['streams'][j]['name']}: {op}")


def mutate_stream_bytes(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    """Byte mutations inside one stream payload (the section CRC is fixed later)."""
    i, j = rng.choice(_streams(doc))
    data = bytearray(_stream_bytes(doc, i, j))
    ops = [op(data, rng, doc) for op in rng.choices(BYTE_OPS, k=rng.choice((1, 1, 2, 3)))]
    _set_stream_bytes(doc, i, j, data)
    notes.append(f"section {i} {doc.entries[i]['streams'][j]['name']} bytes: {', '.join(ops)}")


def recode_stream(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    """Store a stream with another codec or shuffle (a valid change, unless the shuffle does not divide it)."""
    i, j = rng.choice(_streams(doc))
    s = doc.entries[i]["streams"][j]
    plain = _decode(s, _stream_bytes(doc, i, j))
    if plain is None:
        return
    codec, shuffle = rng.choice((("raw", 1), ("zstd", 1), ("zstd", 2), ("zstd", 4)))
    if len(plain) % shuffle:
        return
    _reencode(doc, i, j, plain, codec, shuffle)
    notes.append(f"section {i} {s['name']}: recoded {codec}/{shuffle}")


def reshape_stream(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    """Add or remove rows of a stream, with its shape, decoded_length and payload kept consistent."""
    i, j = rng.choice(_streams(doc))
    s = doc.entries[i]["streams"][j]
    plain = _decode(s, _stream_bytes(doc, i, j))
    if plain is None or not s["shape"]:
        return
    shape = list(s["shape"])
    row = len(plain) // shape[0] if shape[0] else np.dtype(DTYPES[s["dtype"]]).itemsize * math.prod(shape[1:])
    rows = rng.choice((0, 1, max(shape[0] - 1, 0), shape[0] + 1, shape[0] * 2))
    plain = (plain * (rows // max(shape[0], 1) + 1))[: rows * row] if plain else bytes(rows * row)
    shape[0] = rows
    s["shape"], s["decoded_length"] = shape, len(plain)
    _reencode(doc, i, j, plain)
    notes.append(f"section {i} {s['name']}: shape {shape}")


def _stream_index(entry: dict, name: str) -> int:
    return next(j for j, s in enumerate(entry["streams"]) if s["name"] == name)


def _quantized_rows(doc: Doc, i: int) -> np.ndarray:
    """Quantized rows per head of a quantized layer section (from its counts, gaps and cache.exact_positions)."""
    from kvc_format import decode_positions

    entry, cache = doc.entries[i], doc.header["cache"]
    counts, gaps = (_decode(entry["streams"][j], _stream_bytes(doc, i, j)) for j in range(2))
    positions = decode_positions(np.frombuffer(counts, "<i4"), np.frombuffer(gaps, "<i4"), cache["tokens"])
    return np.array([int((p >= cache["exact_positions"]).sum()) for p in positions], np.int64)


def rans_recode(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    """Code a raw or zstd symbol stream with rans at an unusual lane length and table granularity (a valid
    change): the lane layouts the golden rans file never uses reach the decoder."""
    from kvc_format import quantized, rans

    layers = [i for i, e in enumerate(doc.entries) if e["type"] == "kv_layer_quantized"]
    if not layers:
        return
    i = rng.choice(layers)
    entry = doc.entries[i]
    name = rng.choice(("key_symbols", "value_symbols"))
    j, t = _stream_index(entry, name), _stream_index(entry, name.replace("symbols", "tables"))
    plain = _decode(entry["streams"][j], _stream_bytes(doc, i, j))
    if plain is None:
        return
    rows = _quantized_rows(doc, i)
    dim = entry["streams"][j]["shape"][1]
    alphabet = entry["streams"][t]["shape"][1]
    lane_rows = rng.choice((1, 2, 7, 64, 300, 4096))
    tables = rng.choice(quantized.TABLES)
    flat = quantized.to_lanes(np.frombuffer(plain, np.uint8).reshape(-1, dim), rows)
    lengths, table_ids = quantized.lane_layout(rows, dim, lane_rows, tables)
    n_tables = quantized.n_tables(tables, len(rows), dim)
    freq = rans.quantize_frequencies(rans.histograms(flat, lengths, table_ids, n_tables, alphabet))
    s = entry["streams"][j]
    s["codec"], s["params"] = "rans", {"lane_rows": lane_rows, "tables": tables}
    _set_stream_bytes(doc, i, j, rans.encode(flat, lengths, table_ids, freq))
    entry["streams"][t].update(shape=list(freq.shape), decoded_length=freq.nbytes)
    _reencode(doc, i, t, freq.astype("<u2").tobytes())
    notes.append(f"section {i} {name}: rans lane_rows={lane_rows} tables={tables}")


# ------------------------------------------------------------------------------------------------ sections, geometry


def mutate_sections(doc: Doc, rng: random.Random, notes: list[str], goldens: list[Golden]) -> None:
    op = rng.choice(("drop", "duplicate", "swap", "splice", "unknown"))
    n = len(doc.entries)
    if op == "drop" and n:
        i = rng.randrange(n)
        del doc.entries[i], doc.payloads[i]
    elif op == "duplicate" and n:
        i = rng.randrange(n)
        doc.entries.insert(i, copy.deepcopy(doc.entries[i]))
        doc.payloads.insert(i, bytearray(doc.payloads[i]))
    elif op == "swap" and n > 1:
        i, j = rng.sample(range(n), 2)
        doc.entries[i], doc.entries[j] = doc.entries[j], doc.entries[i]
        doc.payloads[i], doc.payloads[j] = doc.payloads[j], doc.payloads[i]
    elif op == "splice" and n:
        other = rng.choice(goldens).doc
        i, j = rng.randrange(n), rng.randrange(len(other.entries))
        doc.entries[i], doc.payloads[i] = copy.deepcopy(other.entries[j]), bytearray(other.payloads[j])
        op = f"splice from {rng.choice(goldens).name}"
    else:
        required = rng.random() < 0.5
        blob = bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 5, 100))))
        stream = {"name": "blob", "codec": "raw", "params": {}, "dtype": "uint8", "shape": [len(blob)], "offset": 0,
                  "length": len(blob), "decoded_length": len(blob)}
        entry = {"type": rng.choice(("notes", "kv_layer_shared", "")), "required": required, "streams": [stream]}
        i = rng.randrange(n + 1)
        doc.entries.insert(i, entry)
        doc.payloads.insert(i, bytearray(blob))
        op = f"unknown section (required={required})"
    notes.append(f"sections: {op}")


def mutate_geometry(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    """Header edits that keep the header self-consistent, so the index checks decide."""
    cache, prompt = doc.header["cache"], doc.header["prompt"]
    op = rng.choice(("tokens", "exact_positions", "key_rope", "kept", "layout", "heads", "windows"))
    if op == "tokens":
        tokens = rng.choice((1, 2, cache["tokens"] - 1, cache["tokens"] + 1, 4096))
        cache["tokens"], prompt["prefix_ids"] = tokens, list(range(tokens))
    elif op == "exact_positions":
        cache["exact_positions"] = rng.choice((0, 1, 3, 5, 8, 499, cache["tokens"]))
    elif op == "key_rope":
        cache["key_rope"] = rng.choice(("applied", "removed"))
    elif op == "kept":
        cache["kept"] = cache.get("kept", 1) + rng.choice((-1, 1))
    elif op == "layout":
        cache["layout"] = rng.choice(("dense", "pruned", "quantized"))
    elif op == "windows":  # windows that move a layer's first position (1.6), or none at all
        if "windows" in cache and rng.random() < 0.3:
            del cache["windows"]
        else:
            tokens = cache["tokens"]
            cache["windows"] = [rng.choice((None, 2, 3, 128, 200, tokens, tokens + 1)) for _ in range(cache["layers"])]
    else:
        key = rng.choice(("kv_heads", "head_dim", "layers"))
        cache[key] = rng.choice((1, 2, 4, 8, cache[key] * 2))
    notes.append(f"geometry: {op}")


def mutate_preamble(doc: Doc, rng: random.Random, notes: list[str]) -> str:
    """Returns why the file became invalid for certain, or ""."""
    op = rng.choice(("minor", "major", "order", "reserved"))
    if op == "minor":
        doc.preamble[10:12] = struct.pack("<H", rng.choice((0, 1, 3, 65535)))
    elif op == "major":
        doc.preamble[8:10] = struct.pack("<H", rng.choice((0, 2, 65535)))
    elif op == "order":
        doc.preamble[12] = rng.choice((0x42, 0x00, 0x6C))
    else:
        doc.preamble[13 + rng.randrange(3)] = rng.randrange(1, 256)
    notes.append(f"preamble: {op}")
    return "reserved bytes" if op == "reserved" else ""


# ------------------------------------------------------------------------------------------------ byte mutations


def _offset(data: bytearray, rng: random.Random) -> int:
    return rng.randrange(len(data)) if data else 0


def op_flip(data: bytearray, rng: random.Random, _=None) -> str:
    if not data:
        return "flip (empty)"
    at = _offset(data, rng)
    data[at] ^= 1 << rng.randrange(8)
    return f"flip@{at}"


def op_boundary(data: bytearray, rng: random.Random, _=None) -> str:
    if not data:
        return "set (empty)"
    at = _offset(data, rng)
    data[at] = rng.choice(BOUNDARY_BYTES)
    return f"set@{at}"


def op_truncate(data: bytearray, rng: random.Random, _=None) -> str:
    keep = rng.choice((rng.randrange(len(data) + 1), max(len(data) - rng.randrange(1, 40), 0)))
    del data[keep:]
    return f"truncate@{keep}"


def op_extend(data: bytearray, rng: random.Random, _=None) -> str:
    n = rng.choice((1, 2, 8, 64, 1000))
    data += rng.choice((bytes(n), bytes([rng.getrandbits(8) for _ in range(n)]), bytes(data[-n:])))
    return f"extend+{n}"


def op_insert(data: bytearray, rng: random.Random, _=None) -> str:
    at, n = _offset(data, rng), rng.choice((1, 2, 4, 16, 100))
    data[at:at] = bytes([rng.choice(BOUNDARY_BYTES + (rng.getrandbits(8),))]) * n
    return f"insert {n}@{at}"


def op_delete(data: bytearray, rng: random.Random, _=None) -> str:
    at, n = _offset(data, rng), rng.choice((1, 2, 4, 16, 100))
    del data[at : at + n]
    return f"delete {n}@{at}"


def op_int(data: bytearray, rng: random.Random, _=None) -> str:
    width = rng.choice((4, 8))
    if len(data) < width:
        return "int (short)"
    at = rng.randrange(len(data) - width + 1)
    value = rng.choice(BOUNDARY_FIELD_INTS) % (1 << 8 * width)
    data[at : at + width] = value.to_bytes(width, "little")
    return f"u{8 * width}@{at}={value}"


BYTE_OPS = (op_flip, op_flip, op_boundary, op_boundary, op_truncate, op_extend, op_insert, op_delete, op_int)


def op_splice(data: bytearray, rng: random.Random, goldens: list[Golden]) -> str:
    src = rng.choice(goldens).data
    start = rng.randrange(len(src))
    piece = src[start : start + rng.choice((8, 64, 512, 4096))]
    at = _offset(data, rng)
    if rng.random() < 0.5:
        data[at : at + len(piece)] = piece
    else:
        data[at:at] = piece
    return f"splice {len(piece)}@{at}"


def op_field(data: bytearray, rng: random.Random, _=None) -> str:
    """Boundary integers over the fixed u32/u64 fields: header_length, header CRC, the footer."""
    if len(data) < 48:
        return "field (short)"
    at, width = rng.choice(((8, 4), (16, 4), (20, 4), (len(data) - 24, 8), (len(data) - 16, 4), (len(data) - 12, 4)))
    value = rng.choice(BOUNDARY_FIELD_INTS + (len(data), len(data) - 24, len(data) + 64)) % (1 << 8 * width)
    data[at : at + width] = value.to_bytes(width, "little")
    return f"field@{at}={value}"


def mutate_bytes(data: bytearray, rng: random.Random, goldens: list[Golden], notes: list[str]) -> None:
    ops = BYTE_OPS + (op_splice, op_field, op_field)
    stack = [op(data, rng, goldens) for op in rng.choices(ops, k=rng.choice((1, 1, 2, 3, 5)))]
    notes.append("bytes: " + ", ".join(stack))


def dirty_padding(data: bytearray, gaps: list, rng: random.Random, notes: list[str]) -> str:
    """Put a non-zero byte in a zero padding gap (not covered by any CRC). Returns "" when there is no gap."""
    if not gaps:
        return ""
    start, end = rng.choice(gaps)
    data[rng.randrange(start, end)] = rng.randrange(1, 256)
    notes.append("padding byte set")
    return "non-zero padding"


# ------------------------------------------------------------------------------------------------ input generation


@dataclass
class Input:
    data: bytes
    notes: list[str]
    invalid: str  # why a mutator made the file invalid for certain ("" if it did not): the reader must refuse it
    valid: bool = False  # only valid-preserving changes: the reader must accept it


STRUCT_MUTATORS = (mutate_stream_values, mutate_stream_values, mutate_stream_bytes, mutate_rans_payload,
                   recode_stream, reshape_stream, rans_recode)


def add_unknown_key(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    """A key no reader knows, in a map where readers must ignore it (a valid change)."""
    entry = rng.choice(doc.entries)
    target = rng.choice((doc.header, doc.header["cache"], doc.index, entry, rng.choice(entry["streams"]),
                         rng.choice(entry["streams"])["params"]))
    target["zz_unknown"] = copy.deepcopy(rng.choice(ODD_VALUES[:9]))
    notes.append("unknown key added")


def add_optional_section(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    blob = bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 5, 100))))
    stream = {"name": "blob", "codec": "raw", "params": {}, "dtype": "uint8", "shape": [len(blob)], "offset": 0,
              "length": len(blob), "decoded_length": len(blob)}
    i = rng.randrange(len(doc.entries) + 1)
    doc.entries.insert(i, {"type": "notes", "required": False, "streams": [stream]})
    doc.payloads.insert(i, bytearray(blob))
    notes.append(f"optional section at {i}")


def swap_sections(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    if len(doc.entries) > 1:
        i, j = rng.sample(range(len(doc.entries)), 2)
        doc.entries[i], doc.entries[j] = doc.entries[j], doc.entries[i]
        doc.payloads[i], doc.payloads[j] = doc.payloads[j], doc.payloads[i]
        notes.append(f"sections {i} and {j} swapped")


def change_minor(doc: Doc, rng: random.Random, notes: list[str]) -> None:
    doc.preamble[10:12] = struct.pack("<H", rng.choice((0, 1, 3, 65535)))
    notes.append("minor version changed")


# Changes that keep a file valid: the reader must still accept it.
VALID_MUTATORS = (recode_stream, rans_recode, rans_recode, add_unknown_key, add_optional_section, swap_sections,
                  change_minor)


def make_valid(golden: Golden, rng: random.Random, notes: list[str]) -> Input:
    doc = copy.deepcopy(golden.doc)
    for mutate in rng.choices(VALID_MUTATORS, k=rng.choice((1, 2, 3))):
        mutate(doc, rng, notes)
    header = _packb(doc.header)
    layout_sections(doc, PREFIX + len(header))
    data, _ = assemble(doc.preamble, header, doc.payloads, _packb(doc.index))
    return Input(bytes(data), notes, "", valid=True)


def make_input(rng: random.Random, goldens: list[Golden]) -> Input:
    golden = rng.choice(goldens)
    notes = [golden.name]
    if rng.random() < 0.08:
        return make_valid(golden, rng, notes)
    if rng.random() < 0.2:
        data = bytearray(golden.data)
        mutate_bytes(data, rng, goldens, notes)
        return Input(bytes(data), notes, "")
    doc = copy.deepcopy(golden.doc)
    invalid = ""
    r = rng.random()
    if r < 0.45:
        for mutate in rng.choices(STRUCT_MUTATORS, k=rng.choice((1, 1, 2))):
            _apply(mutate, doc, rng, notes)
    elif r < 0.55:
        mutate_sections(doc, rng, notes, goldens)
    elif r < 0.65:
        _apply(mutate_geometry, doc, rng, notes)
    elif r < 0.68:
        invalid = mutate_preamble(doc, rng, notes)
    tree = r >= 0.68 or rng.random() < 0.15
    if tree and rng.random() < 0.35:
        mutate_tree(doc.header, rng, notes, "header")
    header, quirky = pack_doc(doc.header, rng, notes, "header")
    invalid = invalid or quirky
    if rng.random() < 0.03:
        header = _corrupt(header, rng, notes, "header")
        invalid = ""
    layout_sections(doc, PREFIX + len(header))
    if tree:
        for _ in range(rng.choice((1, 1, 2, 3))):
            mutate_tree(doc.index, rng, notes, "index")
    index, quirky = pack_doc(doc.index, rng, notes, "index")
    invalid = invalid or quirky
    if rng.random() < 0.03:
        index = _corrupt(index, rng, notes, "index")
        invalid = ""
    data, gaps = assemble(doc.preamble, header, doc.payloads, index)
    if not invalid and rng.random() < 0.03:
        invalid = dirty_padding(data, gaps, rng, notes)
    if not invalid and rng.random() < 0.02:
        data += bytes(rng.choice((1, 24, 64)))
        notes.append("trailing bytes")
        invalid = "trailing bytes"
    if not invalid and rng.random() < 0.08:
        mutate_bytes(data, rng, goldens, notes)
    return Input(bytes(data), notes, invalid)


def _apply(mutate, doc: Doc, rng: random.Random, notes: list[str]) -> None:
    """Run a payload mutator; an earlier mutation may have left a stream it cannot parse, then it does nothing."""
    try:
        mutate(doc, rng, notes)
    except Exception as exc:  # the stream no longer parses: ValueError, ZstdError, KvcFormatError...
        notes.append(f"{mutate.__name__} skipped: {type(exc).__name__}")


def _corrupt(packed: bytes, rng: random.Random, notes: list[str], what: str) -> bytes:
    """Byte mutations of msgpack that then gets a correct length and CRC: the msgpack parser itself is fuzzed."""
    data = bytearray(packed)
    stack = [op(data, rng) for op in rng.choices(BYTE_OPS, k=rng.choice((1, 2)))]
    notes.append(f"{what} msgpack bytes: {', '.join(stack)}")
    return bytes(data)


# ------------------------------------------------------------------------------------------------ the worker


def check_file(path: str) -> None:
    """What every input goes through: open, verify, and decode every layer batch into per-head arrays as the
    export does (RoPE re-applied where the keys were stored without it, any logit bias split per head)."""
    from kvc_format import KvcReader
    from kvc_format.export import head_biases, iter_heads

    with KvcReader(path) as reader:
        reader.verify()
        for _ in iter_heads(reader):
            pass
        for layer in range(reader.geometry.layers):
            reader.head_counts(layer)
            head_biases(reader, layer)
        reader.section_sizes()
        reader.kept_per_layer()


def run_one(path: str) -> dict:
    from kvc_format import KvcFormatError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check_file(path)
            reply = {"outcome": "ok"}
        except KvcFormatError as exc:
            reply = {"outcome": "error", "class": type(exc).__name__, "message": str(exc)[:200]}
        except Exception as exc:  # includes MemoryError and RecursionError: both are failures
            reply = {"outcome": "exception", "class": type(exc).__name__, "signature": _signature(exc),
                     "trace": traceback.format_exc()}
    reply["warnings"] = sorted({f"{w.category.__name__}: {w.message} ({Path(w.filename).name}:{w.lineno})"
                                for w in caught})
    return reply


def _signature(exc: BaseException) -> str:
    """Exception class and the innermost frame inside the kvc_format package (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if f"{os.sep}format{os.sep}" in f.filename] or frames
    where = f"{Path(inside[-1].filename).name}:{inside[-1].lineno}" if inside else "?"
    return f"{type(exc).__name__} at {where}"


def limit_memory(memory_mb: int) -> None:
    """Cap the address space at its current size plus memory_mb, so an unbounded allocation fails."""
    size = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                size = int(line.split()[1]) * 1024
    limit = size + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _read_exact(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def worker_main(memory_mb: int) -> None:
    import kvc_format  # noqa: F401 (import everything before the address-space cap)

    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything printed goes to stderr, not into the reply pipe
    limit_memory(memory_mb)
    with tempfile.TemporaryDirectory(prefix="kvc-fuzz-") as tmp:
        path = os.path.join(tmp, "input.kvc")
        while True:
            size = _read_exact(requests, 4)
            if not size:
                return
            data = _read_exact(requests, struct.unpack("<I", size)[0])
            with open(path, "wb") as f:
                f.write(data)
            reply = json.dumps(run_one(path)).encode()
            replies.write(struct.pack("<I", len(reply)) + reply)


class Worker:
    """A worker subprocess fed inputs over a pipe, with a per-input timeout."""

    def __init__(self, memory_mb: int):
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--memory-mb",
                                      str(memory_mb)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, bufsize=0, env=env)

    def run(self, data: bytes, timeout: float) -> dict:
        try:
            self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        except (BrokenPipeError, OSError):
            return self._crashed()
        deadline = time.monotonic() + timeout
        size = self._read(4, deadline)
        if size is None:
            return self._hung(timeout)
        if not size:
            return self._crashed()
        reply = self._read(struct.unpack("<I", size)[0], deadline)
        if not reply:
            return self._crashed() if reply == b"" else self._hung(timeout)
        return json.loads(reply)

    def _read(self, n: int, deadline: float) -> bytes | None:
        """n bytes, b"" at end of file, None past the deadline."""
        fd, data = self.proc.stdout.fileno(), b""
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - len(data))
            if not chunk:
                return b""
            data += chunk
        return data

    def _hung(self, timeout: float) -> dict:
        self.close()
        return {"outcome": "hang", "signature": f"hang (over {timeout:g} s)", "trace": self._stderr_tail()}

    def _crashed(self) -> dict:
        code = self.proc.wait()
        tail = self._stderr_tail()
        self.close()
        what = f"signal {-code}" if code < 0 else f"exit {code}"
        return {"outcome": "crash", "signature": f"crash ({what})", "trace": tail}

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:].decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()
        self.stderr.close()


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class Failure:
    index: int
    signature: str
    detail: str
    path: str | None


@dataclass
class FuzzReport:
    seed: int
    inputs: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)  # "ok", an error class name, or a failure kind
    signatures: Counter = field(default_factory=Counter)  # failures by signature
    warnings: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)  # the saved (or first) failures
    save_dir: str = ""

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        return sum(self.signatures.values())

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        return (f"seed {self.seed}: {self.inputs} inputs in {self.seconds:.1f} s ({self.rate:.0f}/s); {counts}; "
                f"{self.failed} failures ({len(self.signatures)} distinct)")

    def describe_failures(self) -> str:
        lines = []
        for signature, n in self.signatures.most_common():
            lines.append(f"{n} x {signature}")
            saved = [f for f in self.failures if f.signature == signature]
            lines += [f"  input {f.index}: saved {f.path}" for f in saved[:3]]
            if saved and saved[0].detail.strip():
                lines.append("  " + saved[0].detail.strip().splitlines()[-1])
        lines.append(f"replay one with: python tests/format/fuzzing.py --replay FILE (saved under {self.save_dir})")
        return "\n".join(lines)


def _classify(reply: dict, item: Input) -> tuple[str, str | None]:
    """(outcome key, failure signature or None)."""
    outcome, invalid = reply["outcome"], item.invalid
    if outcome == "error":
        if item.valid:
            return "rejected-valid", f"rejected a valid input ({reply['class']}: {reply['message']})"
        return reply["class"], None
    if outcome == "ok":
        return ("accepted-invalid", f"accepted an invalid input ({invalid})") if invalid else ("ok", None)
    return (f"{outcome}:{reply.get('class', '')}".rstrip(":"), reply["signature"])


def _save(save_dir: Path, seed: int, index: int, signature: str, item: Input, reply: dict) -> str:
    stem = f"{reply['outcome']}-s{seed}-i{index}"
    path = save_dir / f"{stem}.kvc"
    path.write_bytes(item.data)
    text = [f"seed {seed} input {index}", f"signature: {signature}", "mutations:", *(f"  {n}" for n in item.notes),
            "", reply.get("trace", "")]
    (save_dir / f"{stem}.txt").write_text("\n".join(text))
    return str(path)


def fuzz(seconds: float, seed: int, save_dir: str | os.PathLike | None = None, memory_mb: int = 1024,
         timeout: float = 5.0, max_inputs: int | None = None, ignore: tuple[str, ...] = (),
         log=None) -> FuzzReport:
    """Fuzz the reader for `seconds` (or `max_inputs` inputs). Failures whose signature contains one of `ignore`
    are counted under "ignored" instead (for exploring past a known bug)."""
    goldens = load_goldens()
    directory = Path(save_dir) if save_dir else Path(tempfile.mkdtemp(prefix="kvc-fuzz-finds-"))
    directory.mkdir(parents=True, exist_ok=True)
    report = FuzzReport(seed, save_dir=str(directory))
    worker = Worker(memory_mb)
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds and (max_inputs is None or report.inputs < max_inputs):
            index = report.inputs
            item = make_input(random.Random(f"{seed}/{index}"), goldens)
            reply = worker.run(item.data, timeout)
            if reply["outcome"] in ("hang", "crash"):
                worker = Worker(memory_mb)
            report.inputs += 1
            report.warnings.update(reply.get("warnings", ()))
            outcome, signature = _classify(reply, item)
            if signature and any(s in signature for s in ignore):
                outcome, signature = "ignored", None
            report.outcomes[outcome] += 1
            if signature:
                _record(report, directory, index, signature, item, reply, log)
    finally:
        worker.close()
        report.seconds = time.monotonic() - start
    return report


def _record(report: FuzzReport, directory: Path, index: int, signature: str, item: Input, reply: dict, log) -> None:
    report.signatures[signature] += 1
    if report.signatures[signature] > SAVE_PER_SIGNATURE:
        return
    path = _save(directory, report.seed, index, signature, item, reply)
    detail = reply.get("trace") or "mutations: " + "; ".join(item.notes)
    report.failures.append(Failure(index, signature, detail, path))
    if log and report.signatures[signature] == 1:
        log(f"input {index}: {signature}: saved {path}")


# ------------------------------------------------------------------------------------------------ command line


def replay(path: str, memory_mb: int) -> int:
    limit_memory(memory_mb)
    print(f"replaying {path}")
    txt = Path(path).with_suffix(".txt")
    saved = txt.read_text().split("\n\n", 1)[0] if txt.exists() else ""
    print(saved)
    try:
        check_file(path)
    except Exception as exc:
        from kvc_format import KvcFormatError

        traceback.print_exc()
        return 0 if isinstance(exc, KvcFormatError) else 1
    print("ok: the reader accepts this input")
    return 1 if "accepted an invalid input" in saved else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--save-dir", default=None, help="where failing inputs go (default: a new temp dir)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space a worker may add")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds one input may take")
    parser.add_argument("--max-inputs", type=int, default=None)
    parser.add_argument("--ignore", action="append", default=[], help="failure signature substring to not count")
    parser.add_argument("--replay", metavar="FILE", help="run one saved input in-process and show the traceback")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.memory_mb)
        return 0
    if args.replay:
        return replay(args.replay, args.memory_mb)
    seed = random.randrange(1 << 32) if args.seed is None else args.seed
    print(f"fuzzing the .kvc reader for {args.seconds:g} s with seed {seed}", flush=True)
    report = fuzz(args.seconds, seed, args.save_dir, args.memory_mb, args.timeout, args.max_inputs,
                  tuple(args.ignore), log=lambda line: print(line, flush=True))
    print(report.summary())
    for warning, n in report.warnings.most_common(10):
        print(f"  warning x{n}: {warning}")
    if report.failed:
        print(report.describe_failures())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
