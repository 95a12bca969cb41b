"""Stream codecs. Each turns the little-endian element bytes of one stream into a payload and back.

`raw`  : the payload is the element bytes.
`zstd` : the element bytes are split into byte planes (all first bytes, then all second bytes, ...; `shuffle`
         is the element size) and the result is one zstd frame that declares its content size.
`rans` : symbol streams of a `kv_layer_quantized` section only; coded and decoded by `quantized` and `rans`,
         which know the section's lanes and tables.
"""

import numpy as np
import zstandard

from .errors import CodecError

ZSTD_LEVEL = 3


def _shuffle(data: bytes | memoryview, itemsize: int) -> bytes:
    if itemsize == 1:
        return bytes(data)
    planes = np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize).T
    return np.ascontiguousarray(planes).tobytes()


def _unshuffle(data: bytes, itemsize: int) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8)
    if itemsize == 1:
        return planes.copy()
    return np.ascontiguousarray(planes.reshape(itemsize, -1).T).reshape(-1)


def encode(codec: str, data: bytes | memoryview, itemsize: int) -> tuple[bytes, dict]:
    """Encode `data` (a whole number of `itemsize`-byte elements). Returns (payload, codec parameters)."""
    if codec == "raw":
        return bytes(data), {}
    if codec == "zstd":
        shuffled = _shuffle(data, itemsize)
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(shuffled), {
            "shuffle": itemsize
        }
    if codec == "rans":
        raise CodecError("a rans stream is encoded by its section (see kvc_format.quantized)")
    raise CodecError(f"unknown codec {codec!r}")


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_frame_size(payload: memoryview) -> int:
    """Bytes taken by the single zstd frame at the start of `payload`, found by walking its block headers."""
    if bytes(payload[:4]) != _ZSTD_MAGIC:
        raise CodecError("zstd stream does not start with a zstd frame")
    try:
        pos = zstandard.frame_header_size(payload)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd frame header is invalid: {exc}") from None
    has_checksum = (payload[4] >> 2) & 1
    while True:
        if pos + 3 > len(payload):
            raise CodecError("zstd frame is truncated")
        block = int.from_bytes(payload[pos : pos + 3], "little")
        pos += 3
        kind = (block >> 1) & 3
        if kind == 3:
            raise CodecError("zstd frame has a reserved block type")
        pos += 1 if kind == 1 else block >> 3
        if block & 1:
            return pos + 4 * has_checksum


def decode(codec: str, payload: memoryview, decoded_length: int, params: dict) -> np.ndarray:
    """Decode one stream payload to exactly `decoded_length` bytes (a writable uint8 array) or raise CodecError."""
    if codec == "raw":
        if len(payload) != decoded_length:
            raise CodecError(f"raw stream holds {len(payload)} bytes, expected {decoded_length}")
        return np.frombuffer(payload, dtype=np.uint8)
    if codec == "zstd":
        shuffle = params.get("shuffle")
        if type(shuffle) is not int or shuffle not in (1, 2, 4):
            raise CodecError(f"zstd stream has an invalid shuffle parameter {shuffle!r}")
        if decoded_length % shuffle:
            raise CodecError("zstd stream length is not a whole number of elements")
        if _zstd_frame_size(payload) != len(payload):
            raise CodecError("zstd stream has bytes after its frame (or is truncated)")
        try:
            frame = zstandard.get_frame_parameters(payload)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd stream is not a zstd frame: {exc}") from None
        if frame.content_size == zstandard.CONTENTSIZE_UNKNOWN:
            raise CodecError("zstd frame does not declare its content size")
        if frame.content_size != decoded_length:
            raise CodecError(f"zstd frame declares {frame.content_size} bytes, expected {decoded_length}")
        try:
            out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=decoded_length)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd stream does not decode: {exc}") from None
        if len(out) != decoded_length:
            raise CodecError(f"zstd stream decoded to {len(out)} bytes, expected {decoded_length}")
        return _unshuffle(out, shuffle)
    if codec == "rans":
        raise CodecError("a rans stream decodes only within its section (it needs the section's lanes and tables)")
    raise CodecError(f"unknown codec {codec!r}")


CODECS = ("raw", "zstd", "rans")
