"""kvc_format: read and write `.kvc` KV-cache files with numpy alone (no torch, no transformers).

Public surface: `KvcWriter` + `Stream` to write, `KvcReader` to read (`StoredLayer` per layer), `encode_positions` /
`decode_positions` for the gap-coded kept positions of a pruned cache, `KvcFormatError` and its subclasses.
"""

from .constants import MAJOR_VERSION, MINOR_VERSION
from .errors import (
    BadMagicError,
    ChecksumError,
    CodecError,
    KvcFormatError,
    LayoutError,
    LimitError,
    MetadataError,
    TruncatedError,
    UnsupportedVersionError,
)
from .positions import decode_positions, encode_positions
from .reader import CacheGeometry, KvcReader, StoredArray, StoredLayer, bfloat16_to_float32
from .writer import KvcWriter, Stream

__all__ = [
    "MAJOR_VERSION",
    "MINOR_VERSION",
    "BadMagicError",
    "CacheGeometry",
    "ChecksumError",
    "CodecError",
    "KvcFormatError",
    "KvcReader",
    "KvcWriter",
    "LayoutError",
    "LimitError",
    "MetadataError",
    "Stream",
    "StoredArray",
    "StoredLayer",
    "TruncatedError",
    "UnsupportedVersionError",
    "bfloat16_to_float32",
    "decode_positions",
    "encode_positions",
]
