"""A second, minimal `.kvc` reader written from SPEC.md alone (not from `kvc_format`).

Its purpose is to prove the spec complete: tests/format/test_spec_reader.py checks that it decodes every golden file
exactly like the reference reader. It follows the spec's decoding rules and checks the CRCs, the framing and the
decoding invariants, but it is not a hardened reader: it does not attempt every check §4–§9 require.

    read_file(path) -> SpecFile(version, header, layers), each layer a SpecLayer(keys, values, positions, bias)

keys/values are float32: [kv_heads, held_l, head_dim] for dense (positions first_l … tokens − 1, §3: every position
without windows); [kept, head_dim] in kept order for pruned (stored floats widened) and quantized (dequantized per
§4.3). positions is None for dense, else one int64 array per head.
bias is the layer's logit bias per kept row (§4.8), float32, or None.
"""

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zstandard

MAGIC = b"\x89KVC\r\n\x1a\n"
END_MAGIC = b"KVCINDEX"
DTYPES = {"float32": "<f4", "float16": "<f2", "uint8": "u1", "uint16": "<u2", "int32": "<i4", "bfloat16": "<u2"}
SECTION_TYPES = {"dense": "kv_layer", "pruned": "kv_layer_pruned", "quantized": "kv_layer_quantized"}
STREAMS = {
    "kv_layer": ["keys", "values"],
    "kv_layer_pruned": ["counts", "positions", "keys", "values"],
    "kv_layer_bias": ["bias"],
    "kv_layer_quantized": ["counts", "positions", "exact_keys", "exact_values", "key_zero", "key_step", "key_symbols",
                           "key_tables", "value_zero", "value_step", "value_symbols", "value_tables"],
}
PROB_BITS, M, L = 12, 1 << 12, 1 << 16


class SpecError(Exception):
    """Any violation of SPEC.md this reader notices."""


@dataclass
class SpecLayer:
    keys: np.ndarray
    values: np.ndarray
    positions: list[np.ndarray] | None
    bias: np.ndarray | None = None


@dataclass
class SpecFile:
    version: tuple[int, int]
    header: dict
    sections: list[dict]  # the index entries
    layers: list[SpecLayer]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)


def _unpack_map(raw: bytes) -> dict:
    def no_ext(code, data):
        raise SpecError(f"msgpack extension type {code} not allowed (§7)")

    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=no_ext)
    except (ValueError, msgpack.exceptions.ExtraData) as e:  # ExtraData: not exactly one object
        raise SpecError(f"bad msgpack: {e}") from e
    _check(isinstance(value, dict), "msgpack object is not a map")
    return value


def to_float32(data: bytes, dtype: str, shape) -> np.ndarray:
    """Element bytes (§4.4) as a float32 array; bfloat16 is the upper half of a binary32."""
    if dtype == "bfloat16":
        bits = np.frombuffer(data, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    _check(dtype in ("float32", "float16"), f"not a float dtype: {dtype}")
    return np.frombuffer(data, DTYPES[dtype]).astype(np.float32).reshape(shape)


def decode_zstd(payload: bytes, decoded_length: int, shuffle: int) -> bytes:
    """§4.6: one zstd frame declaring its content size, holding the byte planes of the elements."""
    _check(shuffle in (1, 2, 4) and decoded_length % shuffle == 0, f"bad shuffle {shuffle}")
    _check(zstandard.frame_content_size(payload) == decoded_length, "zstd content size != decoded_length")
    d = zstandard.ZstdDecompressor().decompressobj()
    planes = d.decompress(payload)
    _check(d.eof and not d.unused_data, "zstd payload is not exactly one frame")
    _check(len(planes) == decoded_length, "zstd frame decompressed to the wrong size")
    # planes[j * n + i] is byte j of element i -> element bytes i * s + j
    return np.frombuffer(planes, np.uint8).reshape(shuffle, -1).T.tobytes()


def decode_rans(payload: bytes, params: dict, tables: np.ndarray, q_per_head: list[int], head_dim: int) -> np.ndarray:
    """§4.7: lock-step interleaved rANS; returns the [Q, head_dim] uint8 symbols."""
    n, granularity = params["lane_rows"], params["tables"]
    _check(type(n) is int and 1 <= n <= 4096, f"bad lane_rows {n!r}")
    heads = len(q_per_head)
    rows = {"channel": heads * head_dim, "head": heads, "layer": 1}.get(granularity)
    _check(rows is not None and tables.shape[0] == rows, f"bad tables {granularity!r} for {tables.shape[0]} rows")
    freq = tables.astype(np.int64)
    _check(bool(np.all(freq.sum(axis=1) == M)), "a table row does not sum to M")
    cum = np.concatenate([np.zeros((rows, 1), np.int64), np.cumsum(freq, axis=1)[:, :-1]], axis=1)
    lookup = np.stack([np.repeat(np.arange(freq.shape[1]), f) for f in freq])  # [rows, M]: slot -> symbol
    # lane layout: per head, per channel, chunks of n rows of that head's block
    lane_len, lane_row, lane_first, lane_col = [], [], [], []
    first = 0
    for h, q in enumerate(q_per_head):
        for c in range(head_dim):
            for j in range(-(-q // n)):
                lane_len.append(min(n, q - j * n))
                lane_row.append({"channel": h * head_dim + c, "head": h, "layer": 0}[granularity])
                lane_first.append(first + j * n)
                lane_col.append(c)
        first += q
    lanes = len(lane_len)
    _check(4 * lanes <= len(payload) and (len(payload) - 4 * lanes) % 2 == 0, "rans payload length")
    x = np.frombuffer(payload, "<u4", lanes).astype(np.int64)
    words = np.frombuffer(payload, "<u2", offset=4 * lanes).astype(np.int64)
    _check(bool(np.all(x >= L)), "rans state below L")
    lane_len, lane_row = np.array(lane_len, np.int64), np.array(lane_row, np.int64)
    lane_first, lane_col = np.array(lane_first, np.int64), np.array(lane_col, np.int64)
    symbols = np.zeros((first, head_dim), np.uint8)
    w = 0
    for t in range(int(lane_len.max(initial=0))):
        active = np.nonzero(lane_len > t)[0]  # ascending lane order
        xs, tab = x[active], lane_row[active]
        slot = xs & (M - 1)
        s = lookup[tab, slot]
        xs = freq[tab, s] * (xs >> PROB_BITS) + slot - cum[tab, s]
        low = np.nonzero(xs < L)[0]
        _check(w + len(low) <= len(words), "rans payload truncated")
        xs[low] = (xs[low] << 16) | words[w:w + len(low)]
        w += len(low)
        x[active] = xs
        symbols[lane_first[active] + t, lane_col[active]] = s
    _check(bool(np.all(x == L)) and w == len(words), "rans payload corrupt")
    return symbols


def decode_stream(section: bytes, entry: dict, extra=None) -> bytes | np.ndarray:
    payload = section[entry["offset"]:entry["offset"] + entry["length"]]
    _check(len(payload) == entry["length"], "stream outside its section")
    size = np.dtype(DTYPES[entry["dtype"]]).itemsize
    _check(entry["decoded_length"] == int(np.prod(entry["shape"], dtype=object)) * size, "decoded_length != shape")
    codec = entry["codec"]
    if codec == "raw":
        _check(len(payload) == entry["decoded_length"], "raw length != decoded_length")
        return payload
    if codec == "zstd":
        return decode_zstd(payload, entry["decoded_length"], entry["params"]["shuffle"])
    if codec == "rans":
        _check(extra is not None, f"stream {entry['name']} may not use rans")
        return decode_rans(payload, entry["params"], *extra)
    raise SpecError(f"unknown codec {codec!r}")


def decode_positions(counts: np.ndarray, gaps: np.ndarray, tokens: int, first: int) -> list[np.ndarray]:
    """§4.2: every head keeps 1 … held_l positions, each in [first_l, tokens)."""
    _check(bool(np.all((counts >= 1) & (counts <= tokens - first))) and int(counts.sum()) == len(gaps), "bad counts")
    _check(bool(np.all(gaps >= 0)), "negative gap")
    ends = np.cumsum(counts)
    out = [np.cumsum(gaps[e - c:e].astype(np.int64) + 1) - 1 for c, e in zip(counts, ends, strict=True)]
    _check(all(p[-1] < tokens for p in out), "position >= tokens")
    _check(all(p[0] >= first for p in out), "position < first_l")
    return out


def windows(cache: dict) -> list:
    """§3 `cache.windows`: one entry per layer, nil or an int 2 ≤ W ≤ 2^24; absent, no layer has a window."""
    if "windows" not in cache:
        return [None] * cache["layers"]
    found = cache["windows"]
    _check(isinstance(found, list) and len(found) == cache["layers"], "windows must hold one entry per layer")
    _check(all(w is None or (type(w) is int and 2 <= w <= 1 << 24) for w in found), "bad window")
    return found


def first_position(window, tokens: int) -> int:
    """§3: first_l = max(0, tokens − (W − 1)); 0 for a layer without a window."""
    return 0 if window is None else max(0, tokens - (window - 1))


def read_layer(kind: str, section: bytes, entry: dict, cache: dict, first: int) -> SpecLayer:
    streams = entry["streams"]
    _check([s["name"] for s in streams] == STREAMS[kind], f"bad streams in {kind}")
    by_name = {s["name"]: s for s in streams}

    def array(name: str, extra=None) -> np.ndarray:
        s = by_name[name]
        data = decode_stream(section, s, extra)
        if isinstance(data, np.ndarray):
            return data
        if s["dtype"] in ("float32", "float16", "bfloat16"):
            return to_float32(data, s["dtype"], s["shape"])
        return np.frombuffer(data, DTYPES[s["dtype"]]).reshape(s["shape"])

    held = cache["tokens"] - first
    if kind == "kv_layer":
        dense = [cache["kv_heads"], held, cache["head_dim"]]
        _check(by_name["keys"]["shape"] == dense and by_name["values"]["shape"] == dense, "dense shape != held_l")
        return SpecLayer(array("keys"), array("values"), None)
    _check(cache["kv_heads"] <= entry["kept"] <= cache["kv_heads"] * held, "section kept outside [kv_heads, ×held_l]")
    counts, gaps = array("counts"), array("positions")
    positions = decode_positions(counts, gaps, cache["tokens"], first)
    _check(len(gaps) == entry["kept"], "section kept != positions")
    if kind == "kv_layer_pruned":
        return SpecLayer(array("keys"), array("values"), positions)

    # §4.3 quantized
    head_dim, exact_before = cache["head_dim"], cache["exact_positions"]
    exact_rows = np.concatenate(positions) < exact_before
    _check(int(exact_rows.sum()) == entry["exact"], "exact != kept positions < E")
    q_per_head = [int((p >= exact_before).sum()) for p in positions]
    key_tables, value_tables = array("key_tables"), array("value_tables")
    alphabet = value_tables.shape[1]
    _check(key_tables.shape[1] == 256 and alphabet in (4, 8, 16, 256), "bad table columns")
    for name, tables in (("key_symbols", key_tables), ("value_symbols", value_tables)):
        _check((by_name[name]["codec"] == "rans") == (tables.shape[0] > 0), f"{name}: table rows iff rans")
    key_symbols = array("key_symbols", (key_tables, q_per_head, head_dim)).astype(np.float32)
    value_symbols = array("value_symbols", (value_tables, q_per_head, head_dim))
    _check(bool(np.all(value_symbols < alphabet)), "value symbol >= A")
    key_zero, key_step = array("key_zero"), array("key_step")
    _check(bool(np.all(np.isfinite(key_step) & (key_step > 0)) and np.all(np.isfinite(key_zero))), "bad key params")
    value_zero, value_step = array("value_zero"), array("value_step")
    quantized = sum(q_per_head)
    groups = value_step.shape[1]
    _check(groups >= 1 and head_dim % groups == 0, "G must divide head_dim")
    if quantized and value_zero.shape[0] == 0:  # uniform values
        _check(alphabet == 256, "uniform values need A = 256")
        value_zero = np.float32(-128) * value_step
    _check(bool(np.all(np.isfinite(value_step) & (value_step >= 0)) and np.all(np.isfinite(value_zero))),
           "bad value params")
    heads = np.repeat(np.arange(len(q_per_head)), q_per_head)
    # separate float32 multiply and add: each rounded to binary32, no fused multiply-add
    q_keys = key_symbols * key_step[heads] + key_zero[heads]
    width = head_dim // groups
    q_values = value_symbols.astype(np.float32) * np.repeat(value_step, width, axis=1)
    q_values = q_values + np.repeat(value_zero, width, axis=1)
    keys = np.empty((entry["kept"], head_dim), np.float32)
    values = np.empty_like(keys)
    keys[exact_rows], values[exact_rows] = array("exact_keys"), array("exact_values")
    keys[~exact_rows], values[~exact_rows] = q_keys, q_values
    _check(bool(np.all(np.isfinite(keys)) and np.all(np.isfinite(values))), "non-finite key or value")
    return SpecLayer(keys, values, positions)


def read_file(path) -> SpecFile:
    data = Path(path).read_bytes()
    _check(len(data) >= 16 + 8 + 24 and data[:8] == MAGIC, "bad magic or truncated")
    major, minor, order = struct.unpack_from("<HHB", data, 8)
    _check(major == 1 and order == 0x4C and data[13:16] == b"\0\0\0", f"unsupported {major}.{minor} / byte order")
    header_length, header_crc = struct.unpack_from("<II", data, 16)
    _check(header_length <= 64 << 20 and 24 + header_length <= len(data), "header length")
    raw_header = data[24:24 + header_length]
    _check(zlib.crc32(raw_header) == header_crc, "header CRC-32")
    header = _unpack_map(raw_header)

    index_offset, index_length, index_crc, end = struct.unpack_from("<QII8s", data, len(data) - 24)
    _check(end == END_MAGIC and index_length <= 16 << 20, "bad footer")
    _check(index_offset + index_length + 24 == len(data), "index does not end at the footer")
    raw_index = data[index_offset:index_offset + index_length]
    _check(zlib.crc32(raw_index) == index_crc, "index CRC-32")
    sections = _unpack_map(raw_index)["sections"]

    cache = header["cache"]
    layout = cache["layout"]
    _check(layout in SECTION_TYPES, f"unknown layout {layout!r}")
    firsts = [first_position(w, cache["tokens"]) for w in windows(cache)]
    layers: list[SpecLayer | None] = [None] * cache["layers"]
    biases: dict[int, np.ndarray] = {}
    block_end = 24 + header_length
    for entry in sections:
        start = entry["offset"]
        _check(start == -(-block_end // 64) * 64 and not any(data[block_end:start]), "section not at next 64")
        block_end = start + entry["length"]
        section = data[start:block_end]
        _check(len(section) == entry["length"] and zlib.crc32(section) == entry["crc32"], "section CRC-32")
        kind = entry["type"]
        if kind not in STREAMS:
            _check(not entry["required"], f"unknown required section {kind!r} (file {major}.{minor}, reader 1.2)")
            continue
        offset = 0
        for s in entry["streams"]:
            _check(s["offset"] == offset, "streams do not tile their section")
            offset += s["length"]
        _check(offset == entry["length"], "streams do not cover their section")
        if kind == "kv_layer_bias":
            _check(layout != "dense" and entry["layer"] not in biases, "bias section in a dense file, or twice")
            biases[entry["layer"]] = read_bias(section, entry)
            continue
        _check(kind == SECTION_TYPES[layout], f"section {kind} in a {layout} file")
        _check(layers[entry["layer"]] is None, "duplicate layer")
        layers[entry["layer"]] = read_layer(kind, section, entry, cache, firsts[entry["layer"]])
    _check(index_offset == -(-block_end // 64) * 64 and not any(data[block_end:index_offset]), "index not at next 64")
    _check(all(layer is not None for layer in layers), "missing layer section")
    for i, bias in biases.items():
        _check(len(bias) == len(layers[i].keys), "bias length != the layer's kept")
        layers[i].bias = bias
    if layout != "dense":
        held = cache["kv_heads"] * sum(cache["tokens"] - first for first in firsts)
        _check(1 <= cache["kept"] <= held, "cache.kept outside [1, kv_heads × Σ held_l]")
        _check(sum(len(layer.keys) for layer in layers) == cache["kept"], "cache.kept != sum of sections' kept")
    return SpecFile((major, minor), header, sections, layers)


def read_bias(section: bytes, entry: dict) -> np.ndarray:
    """§4.8: one float16 stream `bias`, raw or zstd, every value finite."""
    streams = entry["streams"]
    _check([s["name"] for s in streams] == ["bias"] and streams[0]["dtype"] == "float16", "bad bias stream")
    _check(streams[0]["codec"] in ("raw", "zstd"), "bias codec")
    bias = np.frombuffer(decode_stream(section, streams[0]), "<f2").astype(np.float32)
    _check(bias.shape == tuple(streams[0]["shape"]) and bool(np.all(np.isfinite(bias))), "bad bias")
    return bias


def keys_with_rope(layer: SpecLayer, cache: dict) -> np.ndarray:
    """The keys of a quantized layer stored with `key_rope = "removed"`, RoPE re-applied from
    `cache.rope_inv_freq` (§4.3, "RoPE without the model")."""
    _check(cache.get("key_rope") == "removed" and "rope_inv_freq" in cache, "keys are not stored without RoPE")
    f = np.array(cache["rope_inv_freq"], dtype=np.float32)
    p = np.concatenate(layer.positions).astype(np.float32)
    theta = p[:, None] * f[None, :]
    half = len(f)
    x1, x2, rest = layer.keys[:, :half], layer.keys[:, half : 2 * half], layer.keys[:, 2 * half :]
    return np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta), x2 * np.cos(theta) + x1 * np.sin(theta), rest],
                          axis=1)
