"""Byte-level constants and reader limits of the `.kvc` container (SPEC.md is the normative text)."""

import numpy as np

MAGIC = b"\x89KVC\r\n\x1a\n"
END_MAGIC = b"KVCINDEX"
MAJOR_VERSION = 1
MINOR_VERSION = 6
LITTLE_ENDIAN = ord("L")

PREAMBLE_SIZE = 16  # magic(8) major(u16) minor(u16) byte_order(u8) reserved(3)
HEADER_PREFIX_SIZE = 8  # header_length(u32) header_crc32(u32)
FOOTER_SIZE = 24  # index_offset(u64) index_length(u32) index_crc32(u32) END_MAGIC(8)
ALIGNMENT = 64

MAX_HEADER_BYTES = 64 << 20
MAX_INDEX_BYTES = 16 << 20
MAX_SECTIONS = 65536
MAX_STREAMS_PER_SECTION = 64
MAX_NDIM = 8
MAX_STREAM_BYTES = 16 << 30
# The streams of a file may declare at most this many decoded bytes per file byte (plus a small allowance), so what
# a reader allocates is bounded by the size of the file it was given, whatever the file declares.
MAX_EXPANSION = 1024
EXPANSION_ALLOWANCE = 1 << 20

# Element types a stream may declare. bfloat16 has no numpy dtype: it is carried as its uint16 bit pattern.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
}


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)

# Section types this reader understands, with the stream names each must hold.
SECTION_STREAMS: dict[str, tuple[str, ...]] = {
    "kv_layer": ("keys", "values"),
    "kv_layer_pruned": ("counts", "positions", "keys", "values"),
    "kv_layer_quantized": (
        "counts", "positions", "exact_keys", "exact_values", "key_zero", "key_step", "key_symbols", "key_tables",
        "value_zero", "value_step", "value_symbols", "value_tables",
    ),
    "kv_layer_bias": ("bias",),  # 1.5: a logit bias per kept entry of one pruned or quantized layer
}
BIAS_SECTION = "kv_layer_bias"

# The section type that stores one layer, for each `cache.layout`.
LAYER_SECTION: dict[str, str] = {"dense": "kv_layer", "pruned": "kv_layer_pruned", "quantized": "kv_layer_quantized"}

# How the keys of a quantized cache are stored: with RoPE applied (as the model cached them) or removed.
KEY_ROPE = ("applied", "removed")
