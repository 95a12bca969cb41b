"""Streaming `.kvc` writer: preamble and header first, then one section at a time, then the index and footer."""

import os
import struct
import zlib
from dataclasses import dataclass

from . import codecs
from .atomic import AtomicFile
from .constants import (
    ALIGNMENT,
    DTYPES,
    END_MAGIC,
    LITTLE_ENDIAN,
    MAGIC,
    MAJOR_VERSION,
    MAX_HEADER_BYTES,
    MINOR_VERSION,
)
from .errors import ChecksumError, KvcFormatError, LimitError
from .packing import pack


@dataclass(frozen=True)
class Stream:
    """One array to store: `data` holds its little-endian element bytes in C order. `codec`, when set, replaces the
    section's codec for this stream. `encoded` = (payload, params) is a payload the caller already encoded with
    `codec` (the rANS coder needs the section's geometry, which a stream alone does not know)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview
    codec: str | None = None
    encoded: tuple[bytes, dict] | None = None


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


class KvcWriter:
    """Write a `.kvc` file atomically. Use as a context manager; an exception inside discards the file.

    >>> with KvcWriter("doc.kvc", header) as w:
    ...     w.add_section("kv_layer", {"layer": 0}, [Stream("keys", ...), Stream("values", ...)], codec="zstd")
    """

    def __init__(self, path: str | os.PathLike, header: dict):
        header_bytes = pack(header)
        if len(header_bytes) > MAX_HEADER_BYTES:
            raise LimitError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
        self._file = AtomicFile(path)
        self._sections: list[dict] = []
        self._pos = 0
        self._write(MAGIC + struct.pack("<HHB3x", MAJOR_VERSION, MINOR_VERSION, LITTLE_ENDIAN))
        self._write(struct.pack("<II", len(header_bytes), zlib.crc32(header_bytes)) + header_bytes)

    def _write(self, data: bytes) -> None:
        self._file.file.write(data)
        self._pos += len(data)

    def _pad(self) -> None:
        self._write(b"\0" * (_align(self._pos) - self._pos))

    def add_section(self, type: str, attrs: dict, streams: list[Stream], codec: str, required: bool = True) -> int:
        """Append `streams` as one section, each encoded with its own codec or else `codec`. Returns its bytes."""
        entries, payloads, rel = [], [], 0
        for s in streams:
            itemsize = DTYPES[s.dtype].itemsize
            expected = itemsize
            for dim in s.shape:
                expected *= dim
            if len(s.data) != expected:
                raise KvcFormatError(f"stream {s.name!r}: {len(s.data)} bytes for shape {s.shape} of {s.dtype}")
            stream_codec = codec if s.codec is None else s.codec
            if s.encoded is not None:
                payload, params = s.encoded
            else:
                payload, params = codecs.encode(stream_codec, s.data, itemsize)
            entries.append(
                {
                    "name": s.name,
                    "codec": stream_codec,
                    "params": params,
                    "dtype": s.dtype,
                    "shape": list(s.shape),
                    "offset": rel,
                    "length": len(payload),
                    "decoded_length": expected,
                }
            )
            payloads.append(payload)
            rel += len(payload)
        self._pad()
        crc, offset = 0, self._pos
        for payload in payloads:
            crc = zlib.crc32(payload, crc)
            self._write(payload)
        self._sections.append(
            {"type": type, "required": required, **attrs, "offset": offset, "length": rel, "crc32": crc,
             "streams": entries}
        )
        return rel

    def copy_section(self, section, payload: bytes) -> None:
        """Append a section of another file byte for byte: `section` its reader.SectionInfo, `payload` its bytes,
        checked against the section's length and crc32 (a copy never carries a corrupted section on)."""
        if len(payload) != section.length or zlib.crc32(payload) != section.crc32:
            raise ChecksumError(f"section {section.type!r} at byte {section.offset} does not match its checksum")
        self._pad()
        offset = self._pos
        self._write(payload)
        streams = [{"name": s.name, "codec": s.codec, "params": s.params, "dtype": s.dtype, "shape": list(s.shape),
                    "offset": s.offset, "length": s.length, "decoded_length": s.decoded_length}
                   for s in section.streams]
        self._sections.append({"type": section.type, "required": section.required, **section.attrs,
                               "offset": offset, "length": section.length, "crc32": section.crc32,
                               "streams": streams})

    def close(self) -> None:
        """Write the index and footer, fsync and move the file into place."""
        index = pack({"sections": self._sections})
        self._pad()
        offset = self._pos
        self._write(index)
        self._write(struct.pack("<QII", offset, len(index), zlib.crc32(index)) + END_MAGIC)
        self._file.commit()

    @property
    def bytes_written(self) -> int:
        return self._pos

    def __enter__(self) -> "KvcWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._file.discard()
            return
        try:
            self.close()
        except BaseException:
            self._file.discard()
            raise


def rewrite_header(source: str | os.PathLike, output: str | os.PathLike, header: dict) -> int:
    """Write `source` again at `output` (atomically; it may be `source` itself) with `header` in place of its own
    and every section copied byte for byte, each checked against its checksum. Returns the bytes written. For a
    header field known only once the file exists (kvc's loss estimate, measured by loading the written file)."""
    from .reader import KvcReader

    with KvcReader(source) as reader, KvcWriter(output, header) as writer:
        for section in reader.sections:
            writer.copy_section(section, bytes(reader._read_at(section.offset, section.length)))
        return writer.bytes_written
