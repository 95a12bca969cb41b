"""Validating `.kvc` reader. Everything is checked against caps and the file size before any allocation."""

import dataclasses
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import codecs, quantized, rans
from .constants import (
    ALIGNMENT,
    BIAS_SECTION,
    DTYPES,
    END_MAGIC,
    EXPANSION_ALLOWANCE,
    FOOTER_SIZE,
    HEADER_PREFIX_SIZE,
    KEY_ROPE,
    LAYER_SECTION,
    LITTLE_ENDIAN,
    MAGIC,
    MAJOR_VERSION,
    MAX_EXPANSION,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    MAX_NDIM,
    MAX_SECTIONS,
    MAX_STREAM_BYTES,
    MAX_STREAMS_PER_SECTION,
    MINOR_VERSION,
    PREAMBLE_SIZE,
    SECTION_STREAMS,
)
from .errors import (
    BadMagicError,
    ChecksumError,
    CodecError,
    LayoutError,
    LimitError,
    MetadataError,
    TruncatedError,
    UnsupportedVersionError,
)
from .packing import unpack_map
from .positions import decode_positions

MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 8192
MAX_TOKENS = 1 << 24
CACHE_DTYPES = ("float32", "float16", "bfloat16")
READ_CHUNK = 1 << 30
DECODE_BATCH_ELEMENTS = 64 << 20  # decoded elements per layer batch: 256 MB of float32


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _field(obj: dict, key: str, kind: type, what: str):
    if key not in obj:
        raise MetadataError(f"{what} lacks {key!r}")
    value = obj[key]
    # bool is a subclass of int: a flag must not pass for a count, nor a count for a flag.
    if type(value) is not kind:
        raise MetadataError(f"{what}.{key} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _count(obj: dict, key: str, what: str, low: int, high: int) -> int:
    value = _field(obj, key, int, what)
    if not low <= value <= high:
        raise LimitError(f"{what}.{key} = {value} is outside [{low}, {high}]")
    return value


@dataclass(frozen=True)
class StreamInfo:
    name: str
    codec: str
    params: dict
    dtype: str
    shape: tuple[int, ...]
    offset: int  # relative to the section start
    length: int
    decoded_length: int


@dataclass(frozen=True)
class SectionInfo:
    type: str
    required: bool
    offset: int
    length: int
    crc32: int
    attrs: dict
    streams: tuple[StreamInfo, ...]


class StoredArray(NamedTuple):
    data: np.ndarray
    dtype: str  # the declared element type; bfloat16 data holds its uint16 bit patterns


class StoredLayer(NamedTuple):
    """One layer. Dense: keys/values (kv_heads, held, head_dim), positions None: row t is position
    `geometry.first_position(layer) + t` (held = `geometry.held(layer)`, every token unless the layer has a sliding
    window). Pruned and quantized: keys/values (kept, head_dim), row order head 0's kept positions first, and
    positions the per-head kept positions. A quantized layer is dequantized to float32; when `geometry.key_rope` is
    "removed" its keys still need RoPE at `positions`, unless the layer was read with the model's RoPE tables
    (`read_layers`)."""

    keys: StoredArray
    values: StoredArray
    positions: tuple[np.ndarray, ...] | None


@dataclass(frozen=True)
class CacheGeometry:
    layers: int
    kv_heads: int
    tokens: int
    head_dim: int
    layout: str = "dense"
    exact_positions: int = 0  # quantized: positions below this are stored exactly
    key_rope: str = "applied"  # quantized: "removed" when the keys are stored before RoPE
    rope_inv_freq: tuple[float, ...] | None = None  # key_rope "removed": RoPE frequencies (None in 1.2 files)
    # 1.6: per layer its sliding attention window W, or None for full attention; None when the file has no windows.
    windows: tuple[int | None, ...] | None = None

    def first_position(self, layer: int) -> int:
        """The first position `layer` stores. In a layer of window W a token after the document attends only to the
        document's last W − 1 positions, so only those are stored: tokens − (W − 1), or 0 without a window (or with
        one longer than the document)."""
        window = None if self.windows is None else self.windows[layer]
        return 0 if window is None else max(0, self.tokens - (window - 1))

    def held(self, layer: int) -> int:
        """Positions `layer` stores: first_position(layer) … tokens − 1."""
        return self.tokens - self.first_position(layer)

    @property
    def held_entries(self) -> int:
        """(head, position) entries over all layers, as the model's own (windowed) cache holds them: kv_heads × the
        sum of held(layer); layers × kv_heads × tokens without windows."""
        return self.kv_heads * sum(self.held(layer) for layer in range(self.layers))


def _parse_stream(entry, where: str, section_length: int) -> StreamInfo:
    if not isinstance(entry, dict):
        raise MetadataError(f"{where} is not a map")
    name = _field(entry, "name", str, where)
    codec = _field(entry, "codec", str, where)
    if codec not in codecs.CODECS:
        raise CodecError(f"{where} uses unknown codec {codec!r} (known: {', '.join(codecs.CODECS)})")
    params = _field(entry, "params", dict, where)
    dtype = _field(entry, "dtype", str, where)
    if dtype not in DTYPES:
        raise MetadataError(f"{where} has unknown dtype {dtype!r}")
    shape = _field(entry, "shape", list, where)
    if len(shape) > MAX_NDIM:
        raise LimitError(f"{where} has {len(shape)} dimensions (max {MAX_NDIM})")
    size = DTYPES[dtype].itemsize
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise MetadataError(f"{where} has an invalid dimension {dim!r}")
        size *= dim
        if size > MAX_STREAM_BYTES:
            raise LimitError(f"{where} declares more than {MAX_STREAM_BYTES} bytes")
    offset = _count(entry, "offset", where, 0, section_length)
    length = _count(entry, "length", where, 0, section_length)
    decoded = _count(entry, "decoded_length", where, 0, MAX_STREAM_BYTES)
    if decoded != size:
        raise MetadataError(f"{where} declares {decoded} decoded bytes but shape {shape} of {dtype} is {size}")
    return StreamInfo(name, codec, params, dtype, tuple(shape), offset, length, decoded)


def _parse_section(entry, where: str, file_size: int) -> SectionInfo:
    if not isinstance(entry, dict):
        raise MetadataError(f"{where} is not a map")
    kind = _field(entry, "type", str, where)
    required = _field(entry, "required", bool, where)
    offset = _count(entry, "offset", where, 0, file_size)
    length = _count(entry, "length", where, 0, file_size)
    crc = _count(entry, "crc32", where, 0, 0xFFFFFFFF)
    raw_streams = _field(entry, "streams", list, where)
    if len(raw_streams) > MAX_STREAMS_PER_SECTION:
        raise LimitError(f"{where} has {len(raw_streams)} streams (max {MAX_STREAMS_PER_SECTION})")
    streams = tuple(_parse_stream(s, f"{where}.streams[{j}]", length) for j, s in enumerate(raw_streams))
    position = 0
    for s in streams:
        if s.offset != position:
            raise LayoutError(f"{where}: stream {s.name!r} starts at {s.offset}, expected {position}")
        position += s.length
    if position != length:
        raise LayoutError(f"{where}: streams cover {position} bytes of a {length}-byte section")
    attrs = {k: v for k, v in entry.items() if k not in ("type", "required", "offset", "length", "crc32", "streams")}
    return SectionInfo(kind, required, offset, length, crc, attrs, streams)


def _rope_inv_freq(cache: dict, head_dim: int, version: tuple[int, int]) -> tuple[float, ...] | None:
    if head_dim % 2:
        raise MetadataError(f"keys stored without RoPE need an even head_dim, not {head_dim}")
    if "rope_inv_freq" not in cache and version < (1, 3):
        return None  # 1.2 files did not record the frequencies
    freqs = _field(cache, "rope_inv_freq", list, "header.cache")
    # From 1.4 RoPE may turn only the first 2 × len(freqs) channels (partial rotary); before, the whole head.
    counts = f"1 to {head_dim // 2}" if version >= (1, 4) else str(head_dim // 2)
    count_ok = 1 <= len(freqs) <= head_dim // 2 if version >= (1, 4) else len(freqs) == head_dim // 2
    if not count_ok or not all(type(f) is float and 0 < f <= 1 for f in freqs):
        raise MetadataError(f"header.cache.rope_inv_freq must hold {counts} floats in (0, 1]")
    return tuple(freqs)


def _windows(cache: dict, layers: int) -> tuple[int | None, ...] | None:
    """`cache.windows` (1.6): one entry per layer, nil or a sliding window of 2 to MAX_TOKENS positions."""
    if "windows" not in cache:
        return None
    windows = _field(cache, "windows", list, "header.cache")
    if len(windows) != layers:
        raise MetadataError(f"header.cache.windows has {len(windows)} entries for {layers} layers")
    for layer, window in enumerate(windows):
        if window is None:
            continue
        if type(window) is not int:  # a bool is not a window, nor is a float
            raise MetadataError(f"header.cache.windows[{layer}] must be nil or int, not {type(window).__name__}")
        if not 2 <= window <= MAX_TOKENS:
            raise LimitError(f"header.cache.windows[{layer}] = {window} is outside [2, {MAX_TOKENS}]")
    return tuple(windows)


def _parse_geometry(header: dict, version: tuple[int, int]) -> CacheGeometry:
    cache = _field(header, "cache", dict, "header")
    layout = _field(cache, "layout", str, "header.cache")
    if layout not in LAYER_SECTION:
        raise UnsupportedVersionError(f"cache layout {layout!r} is not supported by this reader")
    layers = _count(cache, "layers", "header.cache", 1, MAX_LAYERS)
    geometry = CacheGeometry(
        layers=layers,
        kv_heads=_count(cache, "kv_heads", "header.cache", 1, MAX_KV_HEADS),
        tokens=_count(cache, "tokens", "header.cache", 1, MAX_TOKENS),
        head_dim=_count(cache, "head_dim", "header.cache", 1, MAX_HEAD_DIM),
        layout=layout,
        windows=_windows(cache, layers),
    )
    if layout == "quantized":
        key_rope = _field(cache, "key_rope", str, "header.cache")
        if key_rope not in KEY_ROPE:
            raise MetadataError(f"header.cache.key_rope {key_rope!r} is not one of {KEY_ROPE}")
        exact = _count(cache, "exact_positions", "header.cache", 0, geometry.tokens)
        inv_freq = _rope_inv_freq(cache, geometry.head_dim, version) if key_rope == "removed" else None
        geometry = dataclasses.replace(geometry, exact_positions=exact, key_rope=key_rope, rope_inv_freq=inv_freq)
    prompt = _field(header, "prompt", dict, "header")
    prefix_ids = _field(prompt, "prefix_ids", list, "header.prompt")
    if len(prefix_ids) != geometry.tokens:
        raise MetadataError(f"header.prompt.prefix_ids has {len(prefix_ids)} ids for {geometry.tokens} tokens")
    if not all(type(t) is int and 0 <= t < 1 << 31 for t in prefix_ids):
        raise MetadataError("header.prompt.prefix_ids holds a value that is not a token id")
    for key in ("question_prefix", "question_suffix"):
        _field(prompt, key, str, "header.prompt")
    _field(header, "model", dict, "header")
    return geometry


class KvcReader:
    """Open a `.kvc` file and validate its structure (not yet the section checksums; see `verify`).

    >>> with KvcReader("doc.kvc") as r:
    ...     keys, values, positions = r.read_layer(0)   # dense: (kv_heads, held, head_dim) each, positions None
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        self._lock = threading.Lock()
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    def _read_at(self, offset: int, length: int) -> bytearray:
        # Positional reads (no shared file offset), so threads may share one reader. Sections are copied into
        # memory and checked there: a file changed on disk after opening fails its checksum, never decodes half-new.
        buf = bytearray(length)
        view, done = memoryview(buf), 0
        while done < length:
            n = self._read_into(view[done : done + READ_CHUNK], offset + done)
            if n == 0:
                raise TruncatedError(f"file ends before byte {offset + length}")
            done += n
        return buf

    def _read_into(self, view: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(self._file.fileno(), [view], offset)
        with self._lock:  # Windows has no positional read
            self._file.seek(offset)
            return self._file.readinto(view)

    def _open(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        self.file_size = size
        preamble = self._read_at(0, min(size, PREAMBLE_SIZE))
        seen = bytes(preamble[: len(MAGIC)])
        if seen != MAGIC[: len(seen)]:
            raise BadMagicError("not a .kvc file (bad magic bytes)")
        if size < PREAMBLE_SIZE + HEADER_PREFIX_SIZE + FOOTER_SIZE:
            raise TruncatedError(f"file of {size} bytes is too short to be a .kvc file")
        major, minor, order = struct.unpack_from("<HHB", preamble, len(MAGIC))
        self.version = (major, minor)
        if major != MAJOR_VERSION:
            raise UnsupportedVersionError(
                f"file is .kvc format {major}.{minor}; this reader reads {MAJOR_VERSION}.x"
            )
        if order != LITTLE_ENDIAN:
            raise UnsupportedVersionError(f"byte order flag {order:#x} is not supported (only 'L')")
        if any(preamble[13:16]):
            raise LayoutError("reserved preamble bytes are not zero")

        header_length, header_crc = struct.unpack(
            "<II", self._read_at(PREAMBLE_SIZE, HEADER_PREFIX_SIZE)
        )
        if header_length > MAX_HEADER_BYTES:
            raise LimitError(f"header of {header_length} bytes exceeds {MAX_HEADER_BYTES}")
        header_end = PREAMBLE_SIZE + HEADER_PREFIX_SIZE + header_length
        if header_end + FOOTER_SIZE > size:
            raise TruncatedError("file ends inside its header")

        footer = self._read_at(size - FOOTER_SIZE, FOOTER_SIZE)
        if bytes(footer[16:]) != END_MAGIC:
            raise BadMagicError("missing end marker: the file is truncated or not a .kvc file")
        index_offset, index_length, index_crc = struct.unpack_from("<QII", footer)
        if index_length > MAX_INDEX_BYTES:
            raise LimitError(f"index of {index_length} bytes exceeds {MAX_INDEX_BYTES}")
        if index_offset + index_length + FOOTER_SIZE != size:
            raise LayoutError("index does not end where the footer starts (trailing or missing bytes)")
        if index_offset < header_end:
            raise LayoutError("index overlaps the header")

        header_bytes = self._read_at(PREAMBLE_SIZE + HEADER_PREFIX_SIZE, header_length)
        if zlib.crc32(header_bytes) != header_crc:
            raise ChecksumError("header checksum mismatch")
        self.header = unpack_map(bytes(header_bytes), "header")
        index_bytes = self._read_at(index_offset, index_length)
        if zlib.crc32(index_bytes) != index_crc:
            raise ChecksumError("index checksum mismatch")
        index = unpack_map(bytes(index_bytes), "index")

        entries = _field(index, "sections", list, "index")
        if len(entries) > MAX_SECTIONS:
            raise LimitError(f"index lists {len(entries)} sections (max {MAX_SECTIONS})")
        sections = [_parse_section(e, f"index.sections[{i}]", size) for i, e in enumerate(entries)]
        self._check_coverage(sections, header_end, index_offset)
        self.geometry = _parse_geometry(self.header, self.version)
        self.sections = self._known_sections(sections)
        decoded = sum(st.decoded_length for s in self.sections for st in s.streams)
        if decoded > MAX_EXPANSION * size + EXPANSION_ALLOWANCE:
            raise LimitError(f"the streams declare {decoded} decoded bytes, more than {MAX_EXPANSION} times the "
                             f"file's {size} bytes")
        self._layers = self._map_layers()

    def _check_coverage(self, sections: list[SectionInfo], header_end: int, index_offset: int) -> None:
        self._gaps = []
        position = header_end
        for i, s in enumerate(sections):
            if s.offset != _align(position):
                raise LayoutError(f"section {i} starts at {s.offset}, expected {_align(position)}")
            self._gaps.append((position, s.offset))
            position = s.offset + s.length
        if index_offset != _align(position):
            raise LayoutError(f"index starts at {index_offset}, expected {_align(position)}")
        self._gaps.append((position, index_offset))

    def _known_sections(self, sections: list[SectionInfo]) -> list[SectionInfo]:
        known = []
        for s in sections:
            if s.type in SECTION_STREAMS:
                known.append(s)
            elif s.required:
                raise UnsupportedVersionError(
                    f"file (format {self.version[0]}.{self.version[1]}) has a required section {s.type!r} that "
                    f"this reader (format {MAJOR_VERSION}.{MINOR_VERSION}) does not know: upgrade kvc"
                )
        return known

    def _map_layers(self) -> list[SectionInfo]:
        """Check every layer section against the header from the index alone, before anything is decoded."""
        g = self.geometry
        kind = LAYER_SECTION[g.layout]
        by_layer: dict[int, SectionInfo] = {}
        kept: dict[int, int] = {}
        biases = [s for s in self.sections if s.type == BIAS_SECTION]
        for s in self.sections:
            if s.type == BIAS_SECTION:
                continue
            if s.type != kind:
                raise LayoutError(f"a {g.layout} cache holds a {s.type!r} section (only {kind!r} is allowed)")
            layer = _count(s.attrs, "layer", f"{kind} section", 0, g.layers - 1)
            if layer in by_layer:
                raise LayoutError(f"layer {layer} appears in two sections")
            names = tuple(st.name for st in s.streams)
            if names != SECTION_STREAMS[kind]:
                raise MetadataError(f"layer {layer} holds streams {names}, expected {SECTION_STREAMS[kind]}")
            if kind == "kv_layer":
                n = g.kv_heads * g.held(layer)
            else:
                n = _count(s.attrs, "kept", f"layer {layer} section", g.kv_heads, g.kv_heads * g.held(layer))
            expected = self._expected_streams(s, layer, n)
            for st in s.streams:
                dtypes, want = expected[st.name]
                if st.dtype not in dtypes:
                    raise MetadataError(f"layer {layer} {st.name} has dtype {st.dtype}, not one of {dtypes}")
                if st.shape != want:
                    raise MetadataError(f"layer {layer} {st.name} has shape {list(st.shape)}, expected {list(want)}")
                if st.codec == "rans" and st.name not in ("key_symbols", "value_symbols"):
                    raise CodecError(f"layer {layer} {st.name}: only symbol streams may use the rans codec")
            by_layer[layer] = s
            kept[layer] = n
        if len(by_layer) != g.layers:
            missing = sorted(set(range(g.layers)) - set(by_layer))
            raise LayoutError(f"layers {missing[:8]} have no section")
        if g.layout != "dense":
            total = _count(self.header["cache"], "kept", "header.cache", 1, g.held_entries)
            if total != sum(kept.values()):
                raise MetadataError(f"header.cache.kept = {total} but the layer sections keep {sum(kept.values())}")
        self._kept = [kept[i] for i in range(g.layers)]
        self._biases = self._map_biases(biases)
        return [by_layer[i] for i in range(g.layers)]

    def _map_biases(self, sections: list[SectionInfo]) -> dict[int, SectionInfo]:
        """Check the logit-bias sections from the index: at most one per layer of a pruned or quantized cache, one
        float16 value per kept entry."""
        if sections and self.geometry.layout == "dense":
            raise LayoutError(f"a dense cache holds a {BIAS_SECTION!r} section (only pruned and quantized ones may)")
        by_layer = {}
        for s in sections:
            layer = _count(s.attrs, "layer", f"{BIAS_SECTION} section", 0, self.geometry.layers - 1)
            if layer in by_layer:
                raise LayoutError(f"layer {layer} has two {BIAS_SECTION} sections")
            if tuple(st.name for st in s.streams) != ("bias",):
                raise MetadataError(f"layer {layer} bias holds streams {[st.name for st in s.streams]}, expected "
                                    "['bias']")
            stream = s.streams[0]
            if stream.dtype != "float16" or stream.shape != (self._kept[layer],):
                raise MetadataError(f"layer {layer} bias is {stream.dtype} of shape {list(stream.shape)}, expected "
                                    f"float16 of shape [{self._kept[layer]}]")
            if stream.codec == "rans":
                raise CodecError(f"layer {layer} bias: only symbol streams may use the rans codec")
            by_layer[layer] = s
        return by_layer

    @property
    def bias_layers(self) -> tuple[int, ...]:
        """The layers that store a logit bias for their kept entries (`read_bias`), from the index."""
        return tuple(sorted(self._biases))

    def read_bias(self, layer: int) -> np.ndarray | None:
        """The logit bias of each kept entry of `layer`, (kept,) float32 in the keys' row order, to add to the
        entry's attention logit; None when the layer stores none (a bias of zero)."""
        section = self._biases.get(layer)
        if section is None:
            return None
        bias = self._read_arrays(section)[0]["bias"].astype(np.float32)
        if not np.isfinite(bias).all():
            raise MetadataError(f"layer {layer} bias holds a value that is not finite")
        return bias

    def _expected_streams(self, s: SectionInfo, layer: int, n: int) -> dict[str, tuple[tuple[str, ...], tuple]]:
        """stream name → (allowed dtypes, shape) for one layer section, from the index alone."""
        g = self.geometry
        ints = ("int32",)
        if s.type == "kv_layer":
            dense = (g.kv_heads, g.held(layer), g.head_dim)
            return {"keys": (CACHE_DTYPES, dense), "values": (CACHE_DTYPES, dense)}
        if s.type == "kv_layer_pruned":
            rows = (n, g.head_dim)
            return {"counts": (ints, (g.kv_heads,)), "positions": (ints, (n,)), "keys": (CACHE_DTYPES, rows),
                    "values": (CACHE_DTYPES, rows)}
        exact = _count(s.attrs, "exact", f"layer {layer} section", 0, min(n, g.kv_heads * g.exact_positions))
        q = n - exact
        shapes = {st.name: st.shape for st in s.streams}
        value_groups = shapes["value_step"][1] if len(shapes["value_step"]) == 2 else -1
        if value_groups < 1 or g.head_dim % value_groups:
            raise MetadataError(f"layer {layer} value_step has shape {list(shapes['value_step'])}: its groups "
                                f"must divide head_dim {g.head_dim}")
        # Without zero points (0 rows) the values are uniform: symbols centred on 128, alphabet 256.
        uniform = len(shapes["value_zero"]) == 2 and shapes["value_zero"][0] == 0 and q > 0
        value_tables = shapes["value_tables"]
        if uniform and (len(value_tables) != 2 or value_tables[1] != 256):
            raise MetadataError(f"layer {layer}: values without zero points need an alphabet of 256")
        tables = {}
        for name, symbols, alphabets in (("key_tables", "key_symbols", (256,)),
                                         ("value_tables", "value_symbols", (4, 8, 16, 256))):
            shape = shapes[name]
            coded = next(st for st in s.streams if st.name == symbols).codec == "rans"
            if len(shape) != 2 or shape[1] not in alphabets or (shape[0] > 0) != coded:
                raise MetadataError(f"layer {layer} {name} has shape {list(shape)}: it needs {alphabets} columns "
                                    "and rows exactly when its symbols use the rans codec")
            tables[name] = (("uint16",), shape)
        floats = ("float32",)
        halves = ("float16",)
        return {
            "counts": (ints, (g.kv_heads,)), "positions": (ints, (n,)),
            "exact_keys": (CACHE_DTYPES, (exact, g.head_dim)), "exact_values": (CACHE_DTYPES, (exact, g.head_dim)),
            "key_zero": (floats, (g.kv_heads, g.head_dim)), "key_step": (floats, (g.kv_heads, g.head_dim)),
            "key_symbols": (("uint8",), (q, g.head_dim)),
            "value_zero": (halves, (0 if uniform else q, value_groups)), "value_step": (halves, (q, value_groups)),
            "value_symbols": (("uint8",), (q, g.head_dim)),
            **tables,
        }

    def _read_arrays(self, section: SectionInfo, names: tuple[str, ...] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, memoryview]]:
        """Check a section's CRC-32 and decode its streams (those in `names`, or all); rans payloads are returned
        undecoded."""
        data = self._read_at(section.offset, section.length)
        if zlib.crc32(data) != section.crc32:
            raise ChecksumError(f"checksum mismatch in the {section.type} section at byte {section.offset}")
        view = memoryview(data)
        arrays, coded = {}, {}
        for s in section.streams:
            if names is not None and s.name not in names:
                continue
            payload = view[s.offset : s.offset + s.length]
            if s.codec == "rans":
                coded[s.name] = payload
                continue
            raw = codecs.decode(s.codec, payload, s.decoded_length, s.params)
            arrays[s.name] = raw.view(DTYPES[s.dtype]).reshape(s.shape)
        return arrays, coded

    def read_section(self, section: SectionInfo) -> dict[str, np.ndarray]:
        """Read one section, check its CRC-32, then decode each stream to an array of its declared shape."""
        arrays, coded = self._read_arrays(section)
        if coded:
            raise CodecError(f"streams {sorted(coded)} decode only through read_layers")
        return arrays

    def _positions(self, layer: int, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        try:
            return decode_positions(arrays["counts"], arrays["positions"], self.geometry.tokens,
                                    self.geometry.first_position(layer))
        except MetadataError as exc:
            raise MetadataError(f"layer {layer}: {exc}") from None

    def head_counts(self, layer: int) -> list[int]:
        """Entries each KV head of `layer` keeps, with its positions validated (reads the section, decodes only its
        positions); a dense layer's heads hold `geometry.held(layer)` each."""
        section = self._layers[layer]
        if section.type == "kv_layer":
            return [self.geometry.held(layer)] * self.geometry.kv_heads
        arrays, _ = self._read_arrays(section, ("counts", "positions"))
        return [len(p) for p in self._positions(layer, arrays)]

    def read_layer(self, layer: int) -> StoredLayer:
        """Keys, values and (pruned, quantized layouts) the validated per-head kept positions of one layer."""
        return self.read_layers([layer])[0]

    def read_layers(self, layers: list[int] | None = None,
                    rope: tuple[np.ndarray, np.ndarray] | None = None) -> list[StoredLayer]:
        """Several layers at once (all by default): the rANS streams of all of them decode in one pass, which is much
        faster than layer by layer. `rope`: the model's (cos, sin) tables as `rope.rotate_rows` takes them, to
        have keys stored before RoPE (`geometry.key_rope` "removed") come back rotated, as the model caches them;
        other keys come back as stored."""
        read = self.read_undecoded(layers)
        pending = [p for p in read if isinstance(p, quantized.UndecodedLayer)]
        batch = [tuple(item) for p in pending for item in p.rans.values()]
        decoded = iter(rans.decode_many(batch) if batch else [])
        rotate = rope if self.geometry.key_rope == "removed" else None
        out = []
        for p in read:
            if isinstance(p, quantized.UndecodedLayer):
                symbols = {name: next(decoded) for name in p.rans}
                keys, values = quantized.decode_layer(p.arrays, symbols, p.exact, p.rows_q, p.positions, rotate)
                p = StoredLayer(StoredArray(keys, "float32"), StoredArray(values, "float32"), p.positions)
            out.append(p)
        return out

    def read_undecoded(self, layers: list[int] | None = None) -> list["StoredLayer | quantized.UndecodedLayer"]:
        """Layers read, checksummed and checked, but a quantized layer's rANS streams left coded (for a decoder
        elsewhere, such as a GPU kernel): dense and pruned layers come back as `StoredLayer`s, quantized ones as
        `quantized.UndecodedLayer`s."""
        layers = list(range(self.geometry.layers)) if layers is None else layers
        g = self.geometry
        out = []
        for layer in layers:
            section = self._layers[layer]
            arrays, coded = self._read_arrays(section)
            dtypes = {s.name: s.dtype for s in section.streams}
            if section.type == "kv_layer":
                out.append(StoredLayer(*(StoredArray(arrays[n], dtypes[n]) for n in ("keys", "values")), None))
                continue
            positions = self._positions(layer, arrays)
            if section.type == "kv_layer_pruned":
                out.append(StoredLayer(*(StoredArray(arrays[n], dtypes[n]) for n in ("keys", "values")), positions))
                continue
            exact, rows_q = quantized.split_exact(positions, g.exact_positions)
            if int(exact.sum()) != section.attrs["exact"]:
                raise MetadataError(f"layer {layer}: {int(exact.sum())} positions are below exact_positions but "
                                    f"the section stores {section.attrs['exact']} exact rows")
            params = {s.name: s.params for s in section.streams}
            items = {}
            for name, table in (("key_symbols", "key_tables"), ("value_symbols", "value_tables")):
                if name in coded:
                    freq = arrays[table]
                    rans.validate_tables(freq, freq.shape[1])
                    items[name] = quantized.rans_item(coded[name], params[name], freq, rows_q, g.head_dim,
                                                      f"layer {layer} {name}")
            out.append(quantized.UndecodedLayer(layer, arrays, items, exact, rows_q, positions))
        return out

    def check_padding(self) -> None:
        """Check that the alignment padding around the sections is zero (no checksum covers it)."""
        for start, end in self._gaps:
            if any(self._read_at(start, end - start)):
                raise LayoutError(f"padding bytes {start}..{end} are not zero")

    def verify(self) -> None:
        """Check padding, every section's checksum, that every stream decodes to its declared size, positions, and
        that every logit bias is finite."""
        self.check_padding()
        for layer, _ in self.iter_layers():
            self.read_bias(layer)

    def layer_batches(self) -> list[list[int]]:
        """Layers to pass to `read_layers` together: a quantized file's rANS streams decode far faster many layers at
        a time (one vectorised pass), up to DECODE_BATCH_ELEMENTS decoded K/V elements to bound memory; other
        layouts gain nothing from it and go layer by layer."""
        if self.geometry.layout != "quantized":
            return [[layer] for layer in range(self.geometry.layers)]
        sizes = [2 * kept * self.geometry.head_dim for kept in self._kept]
        batches, size = [[]], 0
        for layer, elements in enumerate(sizes):
            if batches[-1] and size + elements > DECODE_BATCH_ELEMENTS:
                batches.append([])
                size = 0
            batches[-1].append(layer)
            size += elements
        return batches

    def iter_layers(self, rope: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[tuple[int, StoredLayer]]:
        """(layer, StoredLayer) for every layer in order, decoded a batch at a time (`layer_batches`), so a caller
        can use each layer while later ones are still on disk. `rope` as for `read_layers`."""
        for batch in self.layer_batches():
            yield from zip(batch, self.read_layers(batch, rope), strict=True)

    def section_sizes(self) -> list[int]:
        return [s.length for s in self._layers]

    def kept_per_layer(self) -> list[int]:
        """Entries kept per layer over all its heads, from the index (kv_heads × held(layer) for a dense cache)."""
        return list(self._kept)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "KvcReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

