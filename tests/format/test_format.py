"""The container: writer/reader round trips, and one crafted file per error class (safetensors style)."""

import struct

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc_format import (
    MINOR_VERSION,
    BadMagicError,
    CacheGeometry,
    ChecksumError,
    CodecError,
    KvcReader,
    KvcWriter,
    LayoutError,
    LimitError,
    MetadataError,
    Stream,
    TruncatedError,
    UnsupportedVersionError,
    bfloat16_to_float32,
    decode_positions,
    encode_positions,
)

from kvc_bytes import (
    PRUNED,
    PRUNED_POSITIONS,
    assemble,
    header_dict,
    pruned_layer,
    raw_layer,
    valid_file,
    valid_pruned_file,
)


def write(tmp_path, data: bytes):
    path = tmp_path / "f.kvc"
    path.write_bytes(data)
    return path


def open_and_verify(path):
    with KvcReader(path) as r:
        r.verify()
        return r


def write_with_writer(path, arrays: list[tuple[np.ndarray, np.ndarray]], dtype: str, codec: str) -> dict:
    kv_heads, tokens, head_dim = arrays[0][0].shape
    header = header_dict(layers=len(arrays), kv_heads=kv_heads, tokens=tokens, head_dim=head_dim)
    with KvcWriter(path, header) as w:
        for i, (k, v) in enumerate(arrays):
            streams = [Stream("keys", dtype, k.shape, k.tobytes()), Stream("values", dtype, v.shape, v.tobytes())]
            w.add_section("kv_layer", {"layer": i}, streams, codec=codec)
    return header


def random_array(rng, shape, np_dtype: str) -> np.ndarray:
    if np_dtype == "<u2":  # bfloat16 bit patterns: any 16-bit value must survive
        return rng.integers(0, 2**16, shape, dtype=np.uint16)
    return rng.standard_normal(shape).astype(np_dtype)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("dtype,np_dtype", [("float16", "<f2"), ("float32", "<f4"), ("bfloat16", "<u2")])
def test_round_trip_is_exact(tmp_path, codec, dtype, np_dtype):
    rng = np.random.default_rng(1)
    arrays = [(random_array(rng, (3, 17, 8), np_dtype), random_array(rng, (3, 17, 8), np_dtype)) for _ in range(4)]
    path = tmp_path / "x.kvc"
    header = write_with_writer(path, arrays, dtype, codec)
    with KvcReader(path) as r:
        r.verify()
        assert r.header == header
        assert r.geometry.layers == 4 and r.geometry.tokens == 17
        for i, (k, v) in enumerate(arrays):
            keys, values, positions = r.read_layer(i)
            assert positions is None
            assert keys.dtype == values.dtype == dtype
            np.testing.assert_array_equal(keys.data, k)
            np.testing.assert_array_equal(values.data, v)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 40), st.integers(1, 16)),
    layers=st.integers(1, 3),
    codec=st.sampled_from(["raw", "zstd"]),
    seed=st.integers(0, 2**31),
)
def test_round_trip_random_shapes(tmp_path_factory, shape, layers, codec, seed):
    rng = np.random.default_rng(seed)
    arrays = [(rng.standard_normal(shape).astype("<f2"), rng.standard_normal(shape).astype("<f2"))
              for _ in range(layers)]
    path = tmp_path_factory.mktemp("rt") / "x.kvc"
    write_with_writer(path, arrays, "float16", codec)
    with KvcReader(path) as r:
        r.verify()
        for i, (k, v) in enumerate(arrays):
            keys, values, _ = r.read_layer(i)
            np.testing.assert_array_equal(keys.data, k)
            np.testing.assert_array_equal(values.data, v)


def test_zstd_shrinks_smooth_data(tmp_path):
    k = np.tile(np.linspace(-1, 1, 64, dtype="<f2"), (2, 50, 1))
    raw, packed = tmp_path / "raw.kvc", tmp_path / "zstd.kvc"
    write_with_writer(raw, [(k, k)], "float16", "raw")
    write_with_writer(packed, [(k, k)], "float16", "zstd")
    assert packed.stat().st_size < raw.stat().st_size / 4


def test_bfloat16_widening_is_exact():
    x = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(bfloat16_to_float32(bits), x)


def test_hand_assembled_file_from_spec_reads(tmp_path):
    open_and_verify(write(tmp_path, valid_file()))


def test_writer_exception_leaves_no_file(tmp_path):
    path = tmp_path / "x.kvc"
    with pytest.raises(RuntimeError), KvcWriter(path, header_dict(layers=1)):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_wrong_stream_size(tmp_path):
    with pytest.raises(Exception, match="bytes for shape"), KvcWriter(tmp_path / "x.kvc", header_dict()) as w:
        w.add_section("kv_layer", {"layer": 0}, [Stream("keys", "float16", (2, 2), b"\0" * 6)], codec="raw")
    assert list(tmp_path.iterdir()) == []


def test_dense_1_0_file_still_reads(tmp_path):
    with KvcReader(write(tmp_path, valid_file())) as r:
        r.verify()
        assert r.version == (1, 0) and r.geometry.layout == "dense"
        assert r.kept_per_layer() == [2 * 5, 2 * 5]
        assert r.read_layer(1).positions is None


# --- pruned layout ---------------------------------------------------------------------------------------------

def random_subsets(rng, kv_heads: int, tokens: int) -> list[np.ndarray]:
    return [np.sort(rng.choice(tokens, size=rng.integers(1, tokens + 1), replace=False)) for _ in range(kv_heads)]


def write_pruned(path, layers: list[tuple[list[np.ndarray], np.ndarray, np.ndarray]], tokens: int, dtype: str,
                 codec: str) -> dict:
    """layers: (per-head positions, keys, values) with keys/values (kept, head_dim); counts/positions use zstd."""
    kept = sum(len(k) for _, k, _ in layers)
    header = header_dict(layers=len(layers), kv_heads=len(layers[0][0]), tokens=tokens,
                         head_dim=layers[0][1].shape[1], kept=kept)
    with KvcWriter(path, header) as w:
        for i, (per_head, k, v) in enumerate(layers):
            counts, gaps = encode_positions(per_head)
            streams = [Stream("counts", "int32", counts.shape, counts.tobytes(), codec="zstd"),
                       Stream("positions", "int32", gaps.shape, gaps.tobytes(), codec="zstd"),
                       Stream("keys", dtype, k.shape, k.tobytes()), Stream("values", dtype, v.shape, v.tobytes())]
            w.add_section("kv_layer_pruned", {"layer": i, "kept": len(gaps)}, streams, codec=codec)
    return header


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("dtype,np_dtype", [("float16", "<f2"), ("float32", "<f4")])
def test_pruned_round_trip_is_exact(tmp_path, codec, dtype, np_dtype):
    rng = np.random.default_rng(2)
    tokens, head_dim = 40, 8
    layers = []
    for _ in range(3):
        per_head = random_subsets(rng, 4, tokens)
        kept = sum(len(p) for p in per_head)
        layers.append((per_head, random_array(rng, (kept, head_dim), np_dtype),
                       random_array(rng, (kept, head_dim), np_dtype)))
    path = tmp_path / "p.kvc"
    header = write_pruned(path, layers, tokens, dtype, codec)
    with KvcReader(path) as r:
        r.verify()
        assert r.header == header and r.version == (1, MINOR_VERSION) and r.geometry.layout == "pruned"
        assert r.kept_per_layer() == [len(k) for _, k, _ in layers]
        for i, (per_head, k, v) in enumerate(layers):
            assert {s.name: s.codec for s in r.sections[i].streams} == {
                "counts": "zstd", "positions": "zstd", "keys": codec, "values": codec}
            layer = r.read_layer(i)
            assert layer.keys.dtype == layer.values.dtype == dtype
            np.testing.assert_array_equal(layer.keys.data, k)
            np.testing.assert_array_equal(layer.values.data, v)
            assert len(layer.positions) == len(per_head)
            for got, want in zip(layer.positions, per_head, strict=True):
                np.testing.assert_array_equal(got, want)


def test_hand_assembled_pruned_file_from_spec_reads(tmp_path):
    with KvcReader(write(tmp_path, valid_pruned_file())) as r:
        r.verify()
        assert r.kept_per_layer() == [4, 3]
        for i, want in enumerate(PRUNED_POSITIONS):
            assert [p.tolist() for p in r.read_layer(i).positions] == [list(p) for p in want]


@settings(max_examples=100, deadline=None)
@given(heads=st.lists(st.sets(st.integers(0, 999), min_size=1), min_size=1, max_size=6))
def test_positions_round_trip(heads):
    per_head = [np.array(sorted(h)) for h in heads]
    counts, gaps = encode_positions(per_head)
    assert counts.dtype == gaps.dtype == np.int32 and counts.tolist() == [len(h) for h in heads]
    assert (gaps >= 0).all()
    decoded = decode_positions(counts, gaps, 1000)
    assert [p.tolist() for p in decoded] == [p.tolist() for p in per_head]


@pytest.mark.parametrize("per_head", [[[0, 3], [2, 1]], [[1, 1]], [[-1, 2]], [[0], []], [[0.0, 1.0]], []])
def test_encode_positions_refuses_bad_input(per_head):
    with pytest.raises(ValueError):
        encode_positions([np.array(p) for p in per_head])


# --- crafted files: one per error class ------------------------------------------------------------------------

def test_bad_magic(tmp_path):
    data = bytearray(valid_file())
    data[1] = ord("X")
    with pytest.raises(BadMagicError):
        KvcReader(write(tmp_path, bytes(data)))


def test_text_file_is_not_kvc(tmp_path):
    with pytest.raises(BadMagicError):
        KvcReader(write(tmp_path, b"hello world, this is plain text and long enough to be checked"))


def test_missing_end_marker(tmp_path):
    with pytest.raises(BadMagicError, match="end marker"):
        KvcReader(write(tmp_path, valid_file()[:-3]))


@pytest.mark.parametrize("size", [0, 5, 30])
def test_truncated(tmp_path, size):
    with pytest.raises(TruncatedError):
        KvcReader(write(tmp_path, valid_file()[:size]))


def test_newer_major_version(tmp_path):
    with pytest.raises(UnsupportedVersionError, match="format 2.0"):
        KvcReader(write(tmp_path, assemble(header_dict(), [raw_layer(0), raw_layer(1)], major=2)))


def test_big_endian_flag(tmp_path):
    with pytest.raises(UnsupportedVersionError, match="byte order"):
        KvcReader(write(tmp_path, assemble(header_dict(), [raw_layer(0), raw_layer(1)], order=b"B")))


def test_unknown_required_section_names_versions(tmp_path):
    extra = ({"type": "future_thing", "required": True, "streams": []}, b"")
    data = assemble(header_dict(), [raw_layer(0), raw_layer(1), extra], minor=7)
    with pytest.raises(UnsupportedVersionError, match=rf"format 1\.7.*future_thing.*format 1\.{MINOR_VERSION}"):
        KvcReader(write(tmp_path, data))


def test_unknown_optional_section_is_skipped(tmp_path):
    extra = ({"type": "future_note", "required": False, "streams": []}, b"")
    open_and_verify(write(tmp_path, assemble(header_dict(), [raw_layer(0), extra, raw_layer(1)], minor=3)))


def test_unknown_layout_is_refused(tmp_path):
    header = header_dict()
    header["cache"]["layout"] = "pruned-v9"
    with pytest.raises(UnsupportedVersionError, match="layout 'pruned-v9'"):
        KvcReader(write(tmp_path, assemble(header, [raw_layer(0), raw_layer(1)])))


def test_header_checksum(tmp_path):
    with pytest.raises(ChecksumError, match="header"):
        KvcReader(write(tmp_path, assemble(header_dict(), [raw_layer(0), raw_layer(1)], header_crc=1)))


def test_index_checksum(tmp_path):
    with pytest.raises(ChecksumError, match="index"):
        KvcReader(write(tmp_path, assemble(header_dict(), [raw_layer(0), raw_layer(1)], index_crc=7)))


def test_section_checksum_caught_before_decode(tmp_path):
    data = bytearray(valid_file())
    with KvcReader(write(tmp_path, bytes(data))) as r:
        offset = r.sections[1].offset
    data[offset + 3] ^= 0x40
    path = write(tmp_path, bytes(data))
    with KvcReader(path) as r:
        r.read_layer(0)
        with pytest.raises(ChecksumError):
            r.read_layer(1)
        with pytest.raises(ChecksumError):
            r.verify()


def test_duplicate_header_key(tmp_path):
    # msgpack map with two "cache" keys, built by hand.
    good = msgpack.packb(header_dict(), use_bin_type=True)
    dup = bytes([0x80 | (len(header_dict()) + 1)]) + good[1:] + msgpack.packb("cache") + msgpack.packb({})
    with pytest.raises(MetadataError, match="duplicate key"):
        KvcReader(write(tmp_path, assemble(dup, [raw_layer(0), raw_layer(1)])))


def test_header_not_a_map(tmp_path):
    with pytest.raises(MetadataError, match="not a msgpack map"):
        KvcReader(write(tmp_path, assemble(msgpack.packb([1, 2]), [])))


def test_header_trailing_msgpack_bytes(tmp_path):
    hb = msgpack.packb(header_dict(), use_bin_type=True) + b"\x01"
    with pytest.raises(MetadataError):
        KvcReader(write(tmp_path, assemble(hb, [raw_layer(0), raw_layer(1)])))


def test_bool_is_not_a_count(tmp_path):
    header = header_dict()
    header["cache"]["layers"] = True
    with pytest.raises(MetadataError, match="must be int"):
        KvcReader(write(tmp_path, assemble(header, [raw_layer(0)])))


def test_prefix_ids_must_match_tokens(tmp_path):
    header = header_dict()
    header["prompt"]["prefix_ids"] = [1, 2]
    with pytest.raises(MetadataError, match="prefix_ids"):
        KvcReader(write(tmp_path, assemble(header, [raw_layer(0), raw_layer(1)])))


def test_missing_layer(tmp_path):
    with pytest.raises(LayoutError, match="no section"):
        KvcReader(write(tmp_path, assemble(header_dict(layers=2), [raw_layer(0)])))


def test_duplicate_layer(tmp_path):
    with pytest.raises(LayoutError, match="two sections"):
        KvcReader(write(tmp_path, assemble(header_dict(layers=2), [raw_layer(0), raw_layer(0)])))


def test_trailing_bytes_before_footer(tmp_path):
    data = valid_file()
    tampered = data[:-24] + b"\0" * 8 + data[-24:]
    with pytest.raises(LayoutError, match="trailing"):
        KvcReader(write(tmp_path, tampered))


def test_overlapping_sections(tmp_path):
    header = header_dict()
    entries, payloads = [], []
    for i in range(2):
        entry, payload = raw_layer(i)
        entries.append({**entry, "offset": 128, "length": len(payload), "crc32": 0})
        payloads.append(payload)
    index = msgpack.packb({"sections": entries})
    with pytest.raises(LayoutError):
        KvcReader(write(tmp_path, assemble(header, [], index=index)))


def test_nonzero_padding_fails_verify(tmp_path):
    data = bytearray(valid_file())
    with KvcReader(write(tmp_path, bytes(data))) as r:
        gap_start = r.sections[0].offset + r.sections[0].length
        gap_end = r.sections[1].offset
    assert gap_end > gap_start
    data[gap_start] = 1
    with KvcReader(write(tmp_path, bytes(data))) as r, pytest.raises(LayoutError, match="padding"):
        r.verify()


def test_header_length_cap(tmp_path):
    data = bytearray(valid_file())
    data[16:20] = struct.pack("<I", 0xFFFFFFF0)
    with pytest.raises(LimitError):
        KvcReader(write(tmp_path, bytes(data)))


def test_huge_shape_is_capped_before_allocation(tmp_path):
    entry, payload = raw_layer(0)
    for s in entry["streams"]:
        s["shape"] = [2**40, 2**40, 4]
    with pytest.raises(LimitError):
        KvcReader(write(tmp_path, assemble(header_dict(layers=1), [(entry, payload)])))


def test_huge_layer_count(tmp_path):
    with pytest.raises(LimitError):
        KvcReader(write(tmp_path, assemble(header_dict(layers=2**40), [])))


def test_negative_offset(tmp_path):
    entry, payload = raw_layer(0)
    entry["streams"][0]["offset"] = -1
    with pytest.raises(LimitError):
        KvcReader(write(tmp_path, assemble(header_dict(layers=1), [(entry, payload)])))


def test_decoded_length_must_match_shape(tmp_path):
    entry, payload = raw_layer(0)
    entry["streams"][0]["decoded_length"] += 2
    with pytest.raises(MetadataError, match="decoded bytes"):
        KvcReader(write(tmp_path, assemble(header_dict(layers=1), [(entry, payload)])))


def test_unknown_codec(tmp_path):
    entry, payload = raw_layer(0)
    entry["streams"][1]["codec"] = "lz77"
    with pytest.raises(CodecError, match="unknown codec"):
        KvcReader(write(tmp_path, assemble(header_dict(layers=1), [(entry, payload)])))


def test_unknown_dtype(tmp_path):
    entry, payload = raw_layer(0)
    entry["streams"][0]["dtype"] = "float8"
    with pytest.raises(MetadataError, match="dtype"):
        KvcReader(write(tmp_path, assemble(header_dict(layers=1), [(entry, payload)])))


def _zstd_layer(payload_k: bytes, declared: int, shuffle=2) -> tuple[dict, bytes]:
    shape = [2, 5, 4]
    size = 2 * 5 * 4 * 2
    entry = {"type": "kv_layer", "required": True, "layer": 0, "streams": [
        {"name": "keys", "codec": "zstd", "params": {"shuffle": shuffle}, "dtype": "float16", "shape": shape,
         "offset": 0, "length": len(payload_k), "decoded_length": size},
        {"name": "values", "codec": "raw", "params": {}, "dtype": "float16", "shape": shape,
         "offset": len(payload_k), "length": size, "decoded_length": size},
    ]}
    return entry, payload_k + b"\0" * size


def _read_all(tmp_path, data: bytes):
    with KvcReader(write(tmp_path, data)) as r:
        r.verify()


def test_zstd_bomb_declared_size_is_checked(tmp_path):
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    with pytest.raises(CodecError, match="declares"):
        _read_all(tmp_path, assemble(header_dict(layers=1), [_zstd_layer(bomb, 80)]))


def test_zstd_trailing_bytes(tmp_path):
    frame = zstandard.ZstdCompressor().compress(b"\0" * 80) + b"junk"
    with pytest.raises(CodecError, match="after its frame"):
        _read_all(tmp_path, assemble(header_dict(layers=1), [_zstd_layer(frame, 80)]))


def test_zstd_truncated(tmp_path):
    frame = zstandard.ZstdCompressor().compress(np.arange(40, dtype="<f2").tobytes())[:-3]
    with pytest.raises(CodecError):
        _read_all(tmp_path, assemble(header_dict(layers=1), [_zstd_layer(frame, 80)]))


def test_zstd_bad_shuffle(tmp_path):
    frame = zstandard.ZstdCompressor().compress(b"\0" * 80)
    with pytest.raises(CodecError, match="shuffle"):
        _read_all(tmp_path, assemble(header_dict(layers=1), [_zstd_layer(frame, 80, shuffle=3)]))


def test_not_zstd_payload(tmp_path):
    with pytest.raises(CodecError):
        _read_all(tmp_path, assemble(header_dict(layers=1), [_zstd_layer(b"\xff" * 16, 80)]))


# --- crafted pruned files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("counts,gaps,match", [
    ([4, 0], [0, 1, 1, 0], "head 1 keeps no position"),
    ([3, 2], [0, 1, 1, 3], "counts sum to 5 but 4"),
    ([3, 1], [0, -1, 1, 3], "gap -1 at entry 1 is negative"),
    ([3, 1], [0, 1, 1, 5], "gap 5 at entry 3 reaches past"),
    ([3, 1], [0, 1, 2, 3], "head 0 keeps position 5 of a 5-token"),
])
def test_bad_positions_fail_on_read(tmp_path, counts, gaps, match):
    data = valid_pruned_file([(counts, gaps), PRUNED[1]])
    with KvcReader(write(tmp_path, data)) as r:
        r.read_layer(1)
        with pytest.raises(MetadataError, match=f"layer 0: .*{match}"):
            r.read_layer(0)
        with pytest.raises(MetadataError, match=match):
            r.verify()


@pytest.mark.parametrize("stream,key,value,match", [
    (2, "shape", [2, 8], r"keys has shape \[2, 8\], expected \[4, 4\]"),
    (3, "shape", [16], r"values has shape \[16\]"),
    (1, "shape", [2, 2], r"positions has shape \[2, 2\], expected \[4\]"),
    (0, "dtype", "float32", "counts has dtype float32"),
])
def test_pruned_index_inconsistency_caught_on_open(tmp_path, stream, key, value, match):
    entry, payload = pruned_layer(0, *PRUNED[0])
    entry["streams"][stream][key] = value
    sections = [(entry, payload), pruned_layer(1, *PRUNED[1])]
    with pytest.raises(MetadataError, match=match):
        KvcReader(write(tmp_path, assemble(header_dict(kept=7), sections)))


def test_section_kept_below_kv_heads(tmp_path):
    entry, payload = pruned_layer(0, [1], [0])
    with pytest.raises(LimitError, match="kept"):
        KvcReader(write(tmp_path, assemble(header_dict(layers=1, kept=1), [(entry, payload)])))


def test_header_kept_must_match_sections(tmp_path):
    sections = [pruned_layer(i, *layer) for i, layer in enumerate(PRUNED)]
    with pytest.raises(MetadataError, match="header.cache.kept = 8 but the layer sections keep 7"):
        KvcReader(write(tmp_path, assemble(header_dict(kept=8), sections)))


@pytest.mark.parametrize("kept,make", [(None, lambda i: pruned_layer(i, *PRUNED[i])), (7, raw_layer)])
def test_section_type_must_match_layout(tmp_path, kept, make):
    with pytest.raises(LayoutError, match="cache holds a"):
        KvcReader(write(tmp_path, assemble(header_dict(kept=kept), [make(0), make(1)])))


# --- sliding-window layers (format 1.6) -----------------------------------------------------------------------

def test_geometry_without_windows_holds_every_position():
    g = CacheGeometry(layers=3, kv_heads=2, tokens=17, head_dim=8)
    assert g.windows is None
    assert [g.first_position(layer) for layer in range(3)] == [0, 0, 0]
    assert [g.held(layer) for layer in range(3)] == [17, 17, 17]
    assert g.held_entries == 3 * 2 * 17


def test_geometry_with_windows():
    # A window of W holds the last W - 1 positions; one reaching the document's start holds them all.
    g = CacheGeometry(layers=4, kv_heads=2, tokens=17, head_dim=8, windows=(None, 5, 18, 2))
    assert [g.first_position(layer) for layer in range(4)] == [0, 13, 0, 16]
    assert [g.held(layer) for layer in range(4)] == [17, 4, 17, 1]
    assert g.held_entries == 2 * (17 + 4 + 17 + 1)


def write_windowed(path, arrays: list[tuple[np.ndarray, np.ndarray]], tokens: int, windows: list) -> dict:
    """A dense file whose layers store (kv_heads, held, head_dim) keys and values, with `cache.windows`."""
    kv_heads, _, head_dim = arrays[0][0].shape
    header = header_dict(layers=len(arrays), kv_heads=kv_heads, tokens=tokens, head_dim=head_dim)
    header["cache"]["windows"] = windows
    with KvcWriter(path, header) as w:
        for i, (k, v) in enumerate(arrays):
            streams = [Stream("keys", "float16", k.shape, k.tobytes()),
                       Stream("values", "float16", v.shape, v.tobytes())]
            w.add_section("kv_layer", {"layer": i}, streams, codec="zstd")
    return header


def test_dense_windowed_round_trip(tmp_path):
    rng = np.random.default_rng(16)
    tokens, windows = 20, [None, 6, 25, 21]  # held: 20, 5, 20 (window past the start), 20 (exactly the document)
    held = [20, 5, 20, 20]
    arrays = [(random_array(rng, (2, n, 4), "<f2"), random_array(rng, (2, n, 4), "<f2")) for n in held]
    path = tmp_path / "w.kvc"
    header = write_windowed(path, arrays, tokens, windows)
    with KvcReader(path) as r:
        r.verify()
        assert r.header == header and r.version == (1, MINOR_VERSION) == (1, 6)
        assert r.geometry.windows == (None, 6, 25, 21)
        assert [r.geometry.first_position(layer) for layer in range(4)] == [0, 15, 0, 0]
        assert r.kept_per_layer() == [2 * n for n in held] and r.geometry.held_entries == 2 * sum(held)
        for i, (k, v) in enumerate(arrays):
            assert r.head_counts(i) == [held[i]] * 2
            keys, values, positions = r.read_layer(i)
            assert positions is None and keys.data.shape == (2, held[i], 4)
            np.testing.assert_array_equal(keys.data, k)
            np.testing.assert_array_equal(values.data, v)


def test_windows_of_nil_only_read_as_no_windows(tmp_path):
    rng = np.random.default_rng(17)
    arrays = [(random_array(rng, (2, 9, 4), "<f2"), random_array(rng, (2, 9, 4), "<f2")) for _ in range(2)]
    write_windowed(tmp_path / "w.kvc", arrays, 9, [None, None])
    with KvcReader(tmp_path / "w.kvc") as r:
        r.verify()
        assert r.geometry.windows == (None, None) and r.kept_per_layer() == [18, 18]


@pytest.mark.parametrize("windows,error,match", [
    ({"0": 4}, MetadataError, "windows must be list"),
    ([4], MetadataError, "1 entries for 2 layers"),
    ([None, 4, None], MetadataError, "3 entries for 2 layers"),
    ([None, 1], LimitError, r"windows\[1\] = 1 is outside \[2, 16777216\]"),
    ([-3, None], LimitError, r"windows\[0\] = -3"),
    ([None, 2**24 + 1], LimitError, "outside"),
    ([False, None], MetadataError, "nil or int, not bool"),
    ([None, 4.0], MetadataError, "nil or int, not float"),
    ([None, "4"], MetadataError, "nil or int, not str"),
])
def test_bad_windows_are_refused(tmp_path, windows, error, match):
    header = header_dict()
    header["cache"]["windows"] = windows
    with pytest.raises(error, match=match):
        KvcReader(write(tmp_path, assemble(header, [raw_layer(0), raw_layer(1)], minor=6)))


def test_dense_windowed_layer_must_hold_only_its_window(tmp_path):
    header = header_dict()  # 5 tokens: a window of 3 holds positions 3 and 4
    header["cache"]["windows"] = [3, None]
    with pytest.raises(MetadataError, match=r"layer 0 keys has shape \[2, 5, 4\], expected \[2, 2, 4\]"):
        KvcReader(write(tmp_path, assemble(header, [raw_layer(0), raw_layer(1)], minor=6)))
    open_and_verify(write(tmp_path, assemble(header, [raw_layer(0, tokens=2), raw_layer(1)], minor=6)))


def test_windowed_pruned_positions(tmp_path):
    """A window of 3 on layer 0 of the 5-token pruned file: it holds positions 3 and 4 only."""
    def pruned(layer0):
        header = header_dict(kept=len(layer0[1]) + len(PRUNED[1][1]))
        header["cache"]["windows"] = [3, None]
        sections = [pruned_layer(0, *layer0), pruned_layer(1, *PRUNED[1])]
        return write(tmp_path, assemble(header, sections, minor=6))

    with KvcReader(pruned(([2, 1], [3, 0, 4]))) as r:  # heads keep [3, 4] and [4]
        r.verify()
        assert [p.tolist() for p in r.read_layer(0).positions] == [[3, 4], [4]]
        assert r.head_counts(0) == [2, 1] and r.kept_per_layer() == [3, 3]
    with KvcReader(pruned(([1, 2], [4, 2, 0]))) as r:  # head 1 keeps [2, 3]: 2 is before the window
        with pytest.raises(MetadataError, match="layer 0: head 1 keeps position 2, before 3"):
            r.read_layer(0)
        with pytest.raises(MetadataError, match="before 3"):
            r.head_counts(0)
    with pytest.raises(LimitError, match=r"layer 0 section.kept = 5 is outside \[2, 4\]"):
        KvcReader(pruned(([3, 2], [2, 0, 0, 3, 0])))


def test_windowed_pruned_header_kept_is_bounded_by_the_windows(tmp_path):
    header = header_dict(kept=2 * (2 + 5) + 1)
    header["cache"]["windows"] = [3, None]
    sections = [pruned_layer(0, [2, 1], [3, 0, 4]), pruned_layer(1, *PRUNED[1])]
    with pytest.raises(LimitError, match=r"header.cache.kept = 15 is outside \[1, 14\]"):
        KvcReader(write(tmp_path, assemble(header, sections, minor=6)))


def test_decode_positions_within_a_window():
    counts, gaps = encode_positions([np.array([7, 9]), np.array([8])])
    assert [p.tolist() for p in decode_positions(counts, gaps, 10, first=7)] == [[7, 9], [8]]
    with pytest.raises(MetadataError, match="head 0 keeps position 7, before 8, the first its window holds"):
        decode_positions(counts, gaps, 10, first=8)
    with pytest.raises(MetadataError, match="head 0 keeps 2 positions of a 10-token cache, whose window holds 1"):
        decode_positions(counts, gaps, 10, first=9)
