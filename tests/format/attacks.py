"""Crafted hostile `.kvc` files, at least one per attack class of FORMAT-LESSONS.md, each with the typed error a
reader must raise. Built by hand from SPEC.md (tests/format/kvc_bytes.py) or by editing a golden file and re-assembling
it with correct checksums, so that each attack reaches the check it targets instead of a checksum mismatch.
"""

import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zstandard

from kvc_bytes import (
    align,
    assemble,
    header_dict,
    raw_layer,
    valid_file,
    valid_pruned_file,
)

GOLDEN = Path(__file__).resolve().parents[2] / "format" / "golden"  # the repository's format/golden
PACK = {"use_bin_type": True}


@dataclass(frozen=True)
class Attack:
    number: int  # the attack class in FORMAT-LESSONS.md
    name: str
    build: Callable[[], bytes]
    error: str  # the KvcFormatError subclass a reader raises
    stage: str = "open"  # "open": KvcReader(path) refuses it; "verify": decoding does


def split(data: bytes) -> tuple[dict, list[tuple[dict, bytes]], int]:
    """(header, [(index entry, section bytes)], minor version) of a valid file."""
    header_length = struct.unpack_from("<I", data, 16)[0]
    header = msgpack.unpackb(data[24 : 24 + header_length])
    index_offset, index_length = struct.unpack_from("<QI", data, len(data) - 24)
    index = msgpack.unpackb(data[index_offset : index_offset + index_length])
    sections = [(entry, data[entry["offset"] : entry["offset"] + entry["length"]]) for entry in index["sections"]]
    return header, sections, struct.unpack_from("<H", data, 10)[0]


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def edited(name: str, edit: Callable[[dict, list], None]) -> bytes:
    """A golden file after `edit(header, sections)` changes it in place, re-assembled with valid checksums."""
    header, sections, minor = split(golden(name))
    sections = [(dict(entry), payload) for entry, payload in sections]
    edit(header, sections)
    return assemble(header, sections, minor=minor)


def stream(sections: list, layer: int, name: str) -> dict:
    return next(s for s in sections[layer][0]["streams"] if s["name"] == name)


def replace_payload(sections: list, layer: int, name: str, payload: bytes) -> None:
    """Swap one stream's payload, shifting the following streams of its section."""
    entry, data = sections[layer]
    out, offset = b"", 0
    for s in entry["streams"]:
        chunk = payload if s["name"] == name else data[s["offset"] : s["offset"] + s["length"]]
        s.update(offset=offset, length=len(chunk))
        out += chunk
        offset += len(chunk)
    sections[layer] = (entry, out)


def with_bytes(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


def with_index(body: bytes, entries: list[dict]) -> bytes:
    """`body` (preamble, header, sections) padded, then an index of `entries` as given, then a valid footer."""
    body += b"\0" * (align(len(body)) - len(body))
    index = msgpack.packb({"sections": entries}, **PACK)
    return body + index + struct.pack("<QII", len(body), len(index), zlib.crc32(index)) + b"KVCINDEX"


# --- 1. length-prefix allocation bombs ------------------------------------------------------------------------

def header_length_over_cap() -> bytes:
    return with_bytes(valid_file(), 16, struct.pack("<I", 0xFFFFFFF0))


def header_length_past_end() -> bytes:
    """Under the cap (60 MiB) but far beyond the file's 1 KB: refused before anything is allocated."""
    return with_bytes(valid_file(), 16, struct.pack("<I", 60 << 20))


def index_length_over_cap() -> bytes:
    data = valid_file()
    return with_bytes(data, len(data) - 16, struct.pack("<I", 0xFFFFFFFF))


def msgpack_array_bomb() -> bytes:
    """A header whose msgpack declares a 2^32 − 1 element array in 5 bytes."""
    return assemble(b"\x81\xa5cache\xdd\xff\xff\xff\xff", [])


def prefix_ids_bomb() -> bytes:
    header = header_dict(layers=1)
    header["cache"]["tokens"] = 2**40
    return assemble(header, [raw_layer(0)])


def expansion_bomb() -> bytes:
    """Shapes consistent with the geometry, but declaring far more decoded bytes than the file could expand to."""
    tokens, heads, dim = 64, 64, 8192  # 2 × 256 MiB of float32 from a few kB of zstd frames
    header = header_dict(layers=1, kv_heads=heads, tokens=tokens, head_dim=dim)
    frame = zstandard.ZstdCompressor().compress(b"\0" * 1024)
    size = heads * tokens * dim * 4
    streams = [{"name": n, "codec": "zstd", "params": {"shuffle": 4}, "dtype": "float32",
                "shape": [heads, tokens, dim], "offset": i * len(frame), "length": len(frame), "decoded_length": size}
               for i, n in enumerate(("keys", "values"))]
    return assemble(header, [({"type": "kv_layer", "required": True, "layer": 0, "streams": streams},
                              frame + frame)])


# --- 2. integer overflow in size maths ------------------------------------------------------------------------

def shape_product_wraps() -> bytes:
    """2^32 × 2^32 uint8 elements: 0 modulo 2^64, as a C reader with unchecked 64-bit maths would compute."""
    entry, payload = raw_layer(0)
    entry["streams"][0].update(shape=[2**32, 2**32], dtype="uint8", decoded_length=0)
    return assemble(header_dict(layers=1), [(entry, payload)])


def index_offset_wraps() -> bytes:
    """index_offset + index_length + 24 equals the file size only modulo 2^64."""
    data = valid_file()
    index_offset, index_length = struct.unpack_from("<QI", data, len(data) - 24)
    wrapped = (index_offset + 2**64 - 2**33) % 2**64
    return with_bytes(data, len(data) - 24, struct.pack("<Q", wrapped))


def rope_frequency_overflow() -> bytes:
    """A RoPE frequency whose angles overflow float32 at the file's positions (cos and sin of inf are NaN)."""
    return edited("quantized-rope-channel.kvc", lambda h, s: h["cache"]["rope_inv_freq"].__setitem__(0, 1e30))


# --- 3. negative, sign and underflow --------------------------------------------------------------------------

def negative_stream_offset() -> bytes:
    entry, payload = raw_layer(0)
    entry["streams"][0]["offset"] = -1
    return assemble(header_dict(layers=1), [(entry, payload)])


def negative_dimension() -> bytes:
    entry, payload = raw_layer(0)
    entry["streams"][0]["shape"] = [-2, -5, 4]
    return assemble(header_dict(layers=1), [(entry, payload)])


def negative_count() -> bytes:
    return valid_pruned_file([([-1, 5], [0, 1, 1, 3]), ([1, 2], [1, 0, 0])])


def negative_gap() -> bytes:
    return valid_pruned_file([([3, 1], [0, -1, 1, 3]), ([1, 2], [1, 0, 0])])


# --- 4. out-of-range or overlapping offsets -------------------------------------------------------------------

def aliased_streams() -> bytes:
    """Both streams point at the same bytes (the section claims the size of one)."""
    entry, payload = raw_layer(0)
    half = len(payload) // 2
    entry["streams"][1]["offset"] = 0
    return assemble(header_dict(layers=1), [(entry, payload[:half])])


def section_past_end() -> bytes:
    data = valid_file(layers=1)
    header, sections, minor = split(data)
    index = {"sections": [{**sections[0][0], "offset": 2**40}]}
    return assemble(header, [], index=msgpack.packb(index, **PACK), minor=minor)


def overlapping_sections() -> bytes:
    data = valid_file()
    header, sections, minor = split(data)
    entries = [e for e, _ in sections]
    entries[1] = {**entries[1], "offset": entries[0]["offset"]}
    return with_index(data[: entries[0]["offset"] + entries[0]["length"]], entries)


def stream_past_section() -> bytes:
    entry, payload = raw_layer(0)
    entry["streams"][1]["length"] += 64
    return assemble(header_dict(layers=1), [(entry, payload)])


# --- 5. type confusion ----------------------------------------------------------------------------------------

def counts_as_float() -> bytes:
    return edited("pruned-zstd.kvc", lambda h, s: stream(s, 0, "counts").update(dtype="float32"))


def keys_as_bytes() -> bytes:
    entry, payload = raw_layer(0)
    entry["streams"][0].update(dtype="uint8", shape=[2, 5, 8])
    return assemble(header_dict(layers=1), [(entry, payload)])


def unknown_dtype_object() -> bytes:
    entry, payload = raw_layer(0)
    entry["streams"][0]["dtype"] = "object"
    return assemble(header_dict(layers=1), [(entry, payload)])


def flag_as_count() -> bytes:
    header = header_dict(layers=1)
    header["cache"]["kv_heads"] = True
    return assemble(header, [raw_layer(0)])


def shape_as_map() -> bytes:
    entry, payload = raw_layer(0)
    entry["streams"][0]["shape"] = {"0": 2}
    return assemble(header_dict(layers=1), [(entry, payload)])


# --- 6. unbounded recursion and dimensions --------------------------------------------------------------------

def many_dimensions() -> bytes:
    entry, payload = raw_layer(0)
    entry["streams"][0]["shape"] = [1] * 100_000
    return assemble(header_dict(layers=1), [(entry, payload)])


def deep_nesting() -> bytes:
    """A header of 100 000 nested one-element arrays."""
    depth = 100_000
    return assemble(b"\x81\xa5cache" + b"\x91" * depth + b"\xc0", [])


# --- 7. asserts as validation: see test_attacks (no assert in format/, crafted files under python -O) -----------

# --- 8. zero or huge alignment --------------------------------------------------------------------------------

def misaligned_section() -> bytes:
    data = valid_file(layers=1)
    header, sections, minor = split(data)
    entry, payload = sections[0]
    body = data[: entry["offset"] - 8] + payload  # the section starts 8 bytes early, not on a multiple of 64
    return with_index(body, [{**entry, "offset": entry["offset"] - 8}])


def zero_shuffle() -> bytes:
    """The zstd byte-shuffle width is a divisor: 0 must be refused, not divided by."""
    return edited("dense-zstd.kvc", lambda h, s: stream(s, 0, "keys")["params"].update(shuffle=0))


def zero_lane_rows() -> bytes:
    return edited("quantized-rans.kvc", lambda h, s: stream(s, 0, "value_symbols")["params"].update(lane_rows=0))


def huge_lane_rows() -> bytes:
    return edited("quantized-rans.kvc",
                  lambda h, s: stream(s, 0, "key_symbols")["params"].update(lane_rows=2**31))


# --- 9. parser differentials ----------------------------------------------------------------------------------

def duplicate_header_key() -> bytes:
    header = header_dict(layers=1)
    body = msgpack.packb(header, **PACK)
    # Same map with its "model" entry twice (msgpack maps are counted: bump the count, append the pair again).
    count = body[0] & 0x0F
    extra = msgpack.packb("model", **PACK) + msgpack.packb({"name": "other"}, **PACK)
    return assemble(bytes([0x80 | (count + 1)]) + body[1:] + extra, [raw_layer(0)])


def duplicate_layer() -> bytes:
    return assemble(header_dict(layers=2), [raw_layer(0), raw_layer(0)])


def trailing_msgpack() -> bytes:
    return assemble(msgpack.packb(header_dict(layers=1), **PACK) + b"\xc0", [raw_layer(0)])


def integer_map_key() -> bytes:
    header = msgpack.packb(header_dict(layers=1), **PACK)
    count = header[0] & 0x0F
    return assemble(bytes([0x80 | (count + 1)]) + header[1:] + b"\x01\x02", [raw_layer(0)])


def bytes_map_key() -> bytes:
    """A nested map keyed by a msgpack bin, which a lenient reader would treat like the string key."""
    header = header_dict(layers=1)
    header["model"] = {b"name": "test"}
    return assemble(header, [raw_layer(0)])


# --- 10. trailing data and polyglots --------------------------------------------------------------------------

def trailing_bytes() -> bytes:
    return valid_file() + b"\0" * 64


def zip_appended() -> bytes:
    """A ZIP archive glued after the footer (the classic polyglot)."""
    return valid_file() + b"PK\x05\x06" + b"\0" * 18


def hole_before_index() -> bytes:
    data = valid_file()
    index_offset, index_length, index_crc = struct.unpack_from("<QII", data, len(data) - 24)
    index = data[index_offset : index_offset + index_length]
    return (data[:index_offset] + b"\0" * 64 + index
            + struct.pack("<QII", index_offset + 64, index_length, index_crc) + b"KVCINDEX")


# --- 11. code execution ---------------------------------------------------------------------------------------

def pickle_codec() -> bytes:
    payload = pickle.dumps(np.zeros((2, 5, 4), np.float16))
    entry, raw = raw_layer(0)
    entry["streams"][0].update(codec="pickle", length=len(payload))
    entry["streams"][1]["offset"] = len(payload)
    return assemble(header_dict(layers=1), [(entry, payload + raw[len(raw) // 2 :])])


def msgpack_extension() -> bytes:
    header = msgpack.packb(header_dict(layers=1), **PACK)
    count = header[0] & 0x0F
    ext = msgpack.packb("hook", **PACK) + msgpack.packb(msgpack.ExtType(42, b"os.system('id')"), **PACK)
    return assemble(bytes([0x80 | (count + 1)]) + header[1:] + ext, [raw_layer(0)])


def msgpack_timestamp() -> bytes:
    """Extension type -1 (timestamp), which msgpack decodes itself instead of passing it to ext_hook."""
    header = header_dict(layers=1)
    header["kvc"] = {"made": msgpack.Timestamp(0)}
    return assemble(header, [raw_layer(0)])


# --- 12. decompression bombs ----------------------------------------------------------------------------------

def zstd_bomb() -> bytes:
    """A 64 MiB frame of zeros in a stream declared as 80 bytes."""
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    return edited("dense-zstd.kvc", lambda h, s: replace_payload(s, 0, "keys", bomb))


def zstd_without_content_size() -> bytes:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (2 * 500 * 16 * 2))
    return edited("dense-zstd.kvc", lambda h, s: replace_payload(s, 0, "keys", frame))


def rans_too_few_state_bytes() -> bytes:
    """A rANS stream whose lanes need more 4-byte states than its payload holds."""
    return edited("quantized-rans.kvc", lambda h, s: replace_payload(s, 0, "key_symbols", b"\0" * 8))


def rans_bad_tables() -> bytes:
    """Probability tables that do not sum to 4096: a decoder trusting them would index past its tables."""
    def edit(header, sections):
        tables = stream(sections, 0, "value_tables")
        entry, data = sections[0]
        planes = zstandard.ZstdDecompressor().decompress(data[tables["offset"] : tables["offset"] + tables["length"]])
        freq = np.frombuffer(planes, np.uint8).reshape(2, -1).T.copy().view("<u2")  # undo the byte shuffle
        freq[0, 0] = 0xFFFF
        tables.update(codec="raw", params={})
        replace_payload(sections, 0, "value_tables", freq.tobytes())
    return edited("quantized-rans.kvc", edit)


# --- 13. file changed while mapped: see test_attacks (rewritten and truncated under an open reader) -------------

# --- logit-bias sections (format 1.5) -------------------------------------------------------------------------
# pruned-bias.kvc holds [layer 0, bias 0, layer 1, bias 1]: section 1 is layer 0's bias.

def bias_not_finite() -> bytes:
    """A float16 NaN bias: softmax over it would turn the head's whole output into NaN."""
    def edit(header, sections):
        replace_payload(sections, 1, "bias", b"\x00\x7e" * stream(sections, 1, "bias")["shape"][0])
    return edited("pruned-bias.kvc", edit)


def bias_shorter_than_kept() -> bytes:
    def edit(header, sections):
        n = stream(sections, 1, "bias")["shape"][0] - 1
        replace_payload(sections, 1, "bias", b"\x00\x00" * n)
        stream(sections, 1, "bias").update(shape=[n], decoded_length=2 * n)
    return edited("pruned-bias.kvc", edit)


def bias_as_float32() -> bytes:
    def edit(header, sections):
        bias = stream(sections, 1, "bias")
        replace_payload(sections, 1, "bias", b"\x00" * 2 * bias["decoded_length"])
        bias.update(dtype="float32", decoded_length=2 * bias["decoded_length"])
    return edited("pruned-bias.kvc", edit)


def bias_twice_for_one_layer() -> bytes:
    return edited("pruned-bias.kvc", lambda h, s: s[3][0].update(layer=0))


def bias_in_a_dense_file() -> bytes:
    def edit(header, sections):
        payload = np.zeros(10, "<f2").tobytes()
        entry = {"type": "kv_layer_bias", "required": True, "layer": 0, "streams": [
            {"name": "bias", "codec": "raw", "params": {}, "dtype": "float16", "shape": [10], "offset": 0,
             "length": len(payload), "decoded_length": len(payload)}]}
        sections.append((entry, payload))
    return edited("dense-raw.kvc", edit)


# --- sliding-window layers (format 1.6) -------------------------------------------------------------------------
# dense-windows-zstd.kvc: windows [None, 128], layer 1 holds positions 373 … 499 (127 per head).

def with_windows(name: str, windows: list) -> bytes:
    """A golden file with `cache.windows` set as given, written as a 1.6 file."""
    header, sections, _ = split(golden(name))
    header["cache"]["windows"] = windows
    return assemble(header, sections, minor=6)


def windows_one_short() -> bytes:
    """One entry for two layers: a reader indexing windows[layer] would read past the array."""
    return with_windows("dense-windows-zstd.kvc", [128])


def window_of_one() -> bytes:
    """W = 1 would make first_l = tokens, a layer holding nothing (W = 0: past the end)."""
    return with_windows("dense-windows-zstd.kvc", [None, 1])


def window_of_zero() -> bytes:
    return with_windows("dense-windows-zstd.kvc", [None, 0])


def window_as_bool() -> bytes:
    return with_windows("dense-windows-zstd.kvc", [None, True])


def window_as_float() -> bytes:
    return with_windows("dense-windows-zstd.kvc", [None, 128.0])


def dense_window_with_full_shapes() -> bytes:
    """A window on layer 1, whose kv_layer still holds every position (as a 1.5 writer stored it)."""
    return with_windows("dense-zstd.kvc", [None, 128])


def pruned_position_before_its_window() -> bytes:
    """Layer 0 of pruned-zstd.kvc keeps the sinks 0 … 3; a window of 400 holds only positions 101 … 499."""
    return with_windows("pruned-zstd.kvc", [400, None])


def section_kept_beyond_its_window() -> bytes:
    """Layer 0 keeps more than the 2 × 199 entries a window of 200 leaves it."""
    return with_windows("pruned-zstd.kvc", [200, None])


def header_kept_beyond_the_windows() -> bytes:
    """cache.kept above kv_heads × Σ held_l (2 × (199 + 500)), refused before it is compared with the sections."""
    def edit(header, sections):
        header["cache"]["kept"] = 2 * (199 + 500) + 1
    return edited("quantized-windows-rans.kvc", edit)


ATTACKS = [
    Attack(1, "header length over the cap", header_length_over_cap, "LimitError"),
    Attack(1, "header length past the end of the file", header_length_past_end, "TruncatedError"),
    Attack(1, "index length over the cap", index_length_over_cap, "LimitError"),
    Attack(1, "msgpack array of 2^32 - 1 elements", msgpack_array_bomb, "MetadataError"),
    Attack(1, "2^40 tokens", prefix_ids_bomb, "LimitError"),
    Attack(1, "decoded sizes far beyond the file", expansion_bomb, "LimitError"),
    Attack(2, "shape product wraps to 0 in 64 bits", shape_product_wraps, "LimitError"),
    Attack(2, "index offset wraps around 2^64", index_offset_wraps, "LayoutError"),
    Attack(2, "RoPE frequency overflowing the angles", rope_frequency_overflow, "MetadataError"),
    Attack(3, "negative stream offset", negative_stream_offset, "LimitError"),
    Attack(3, "negative dimensions", negative_dimension, "MetadataError"),
    Attack(3, "negative kept count", negative_count, "MetadataError", "verify"),
    Attack(3, "negative position gap", negative_gap, "MetadataError", "verify"),
    Attack(4, "two streams aliasing one byte range", aliased_streams, "LayoutError"),
    Attack(4, "section offset past the end", section_past_end, "LimitError"),
    Attack(4, "overlapping sections", overlapping_sections, "LayoutError"),
    Attack(4, "stream longer than its section", stream_past_section, "LayoutError"),
    Attack(5, "counts declared float32", counts_as_float, "MetadataError"),
    Attack(5, "keys declared uint8", keys_as_bytes, "MetadataError"),
    Attack(5, "dtype 'object'", unknown_dtype_object, "MetadataError"),
    Attack(5, "a bool where a count belongs", flag_as_count, "MetadataError"),
    Attack(5, "a map where a shape belongs", shape_as_map, "MetadataError"),
    Attack(6, "100 000 dimensions", many_dimensions, "LimitError"),
    Attack(6, "msgpack nested 100 000 deep", deep_nesting, "MetadataError"),
    Attack(8, "section not on a 64-byte boundary", misaligned_section, "LayoutError"),
    Attack(8, "zstd shuffle width 0", zero_shuffle, "CodecError", "verify"),
    Attack(8, "rANS lanes of 0 rows", zero_lane_rows, "MetadataError", "verify"),
    Attack(8, "rANS lanes of 2^31 rows", huge_lane_rows, "MetadataError", "verify"),
    Attack(9, "duplicate header key", duplicate_header_key, "MetadataError"),
    Attack(9, "one layer stored twice", duplicate_layer, "LayoutError"),
    Attack(9, "bytes after the header's msgpack map", trailing_msgpack, "MetadataError"),
    Attack(9, "integer map key", integer_map_key, "MetadataError"),
    Attack(9, "bytes map key in a nested map", bytes_map_key, "MetadataError"),
    Attack(10, "bytes after the footer", trailing_bytes, "BadMagicError"),
    Attack(10, "ZIP archive appended", zip_appended, "BadMagicError"),
    Attack(10, "hole before the index", hole_before_index, "LayoutError"),
    Attack(11, "pickle payload with codec 'pickle'", pickle_codec, "CodecError"),
    Attack(11, "msgpack extension type in the header", msgpack_extension, "MetadataError"),
    Attack(11, "msgpack timestamp in the header", msgpack_timestamp, "MetadataError"),
    Attack(12, "64 MiB zstd frame in an 80-byte stream", zstd_bomb, "CodecError", "verify"),
    Attack(12, "zstd frame without a content size", zstd_without_content_size, "CodecError", "verify"),
    Attack(12, "rANS lanes without their state bytes", rans_too_few_state_bytes, "MetadataError", "verify"),
    Attack(12, "rANS tables not summing to 4096", rans_bad_tables, "CodecError", "verify"),
    Attack(2, "a logit bias of NaN", bias_not_finite, "MetadataError", "verify"),
    Attack(4, "a bias one entry short of the layer's kept", bias_shorter_than_kept, "MetadataError"),
    Attack(5, "bias declared float32", bias_as_float32, "MetadataError"),
    Attack(9, "one layer's bias stored twice", bias_twice_for_one_layer, "LayoutError"),
    Attack(9, "a bias section in a dense file", bias_in_a_dense_file, "LayoutError"),
    Attack(4, "windows one entry short of the layers", windows_one_short, "MetadataError"),
    Attack(3, "a window of 1 position", window_of_one, "LimitError"),
    Attack(3, "a window of 0 positions", window_of_zero, "LimitError"),
    Attack(5, "a window declared as a bool", window_as_bool, "MetadataError"),
    Attack(5, "a window declared as a float", window_as_float, "MetadataError"),
    Attack(4, "a windowed dense layer with every position", dense_window_with_full_shapes, "MetadataError"),
    Attack(3, "a pruned position before its layer's window", pruned_position_before_its_window, "MetadataError",
           "verify"),
    Attack(1, "a section keeping more than its window holds", section_kept_beyond_its_window, "LimitError"),
    Attack(1, "cache.kept beyond what the windows hold", header_kept_beyond_the_windows, "LimitError"),
]
IDS = [f"{a.number:02d}-{a.name}" for a in ATTACKS]  # test ids: the attack class, then what the file does


def write_crafted(folder: Path) -> dict[str, Path]:
    """Every attack's crafted file written under `folder`, by its id."""
    paths = {}
    for attack, name in zip(ATTACKS, IDS, strict=True):
        paths[name] = folder / f"{name.replace(' ', '_').replace('/', '_')}.kvc"
        paths[name].write_bytes(attack.build())
    return paths
