"""kvc_format: read and write `.kvc` KV-cache files with numpy alone (no torch, no transformers).

Public surface: `load_file` (a whole cache as per-head numpy arrays) and `export_file` (the same as safetensors);
`export_mlx` (an MLX-LM prompt-cache file);
`KvcReader` to read layer by layer (`StoredLayer` per layer) and `KvcWriter` + `Stream` to write;
`encode_positions` / `decode_positions` for the gap-coded kept positions of a pruned cache; `apply_rope` for keys
stored without RoPE; `KvcFormatError` and its subclasses. `python -m kvc_format --help` for the command line.
"""

from .constants import MAJOR_VERSION, MINOR_VERSION, bfloat16_to_float32
from .errors import (
    BadMagicError,
    ChecksumError,
    CodecError,
    ExportError,
    KvcFormatError,
    LayoutError,
    LimitError,
    MetadataError,
    TruncatedError,
    UnsupportedVersionError,
)
from .export import export_file, load_file
from .mlx_cache import export_mlx
from .positions import decode_positions, encode_positions
from .reader import CacheGeometry, KvcReader, StoredArray, StoredLayer
from .rope import apply_rope
from .writer import KvcWriter, Stream, rewrite_header

__all__ = [
    "rewrite_header",
    "MAJOR_VERSION",
    "MINOR_VERSION",
    "BadMagicError",
    "CacheGeometry",
    "ChecksumError",
    "CodecError",
    "ExportError",
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
    "apply_rope",
    "bfloat16_to_float32",
    "decode_positions",
    "encode_positions",
    "export_file",
    "export_mlx",
    "load_file",
]
