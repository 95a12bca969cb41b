"""The metadata of a GGUF model file (llama.cpp's format), read with the standard library alone, and the vocabulary
digest that ties a `.kvc` file to a model's tokens.

Only the key/value metadata at the head of the file is read; tensors are never touched. The file is untrusted:
every count and length is checked against caps and against the bytes left before anything is allocated, and every
failure is an `ExportError` naming the file.
"""

import hashlib
import json
import os
import struct
from typing import BinaryIO

from .errors import ExportError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_KEYS = 1 << 16
MAX_STRING = 1 << 24  # chat templates run to tens of kilobytes; nothing legitimate comes near 16 MiB
MAX_ARRAY = 1 << 24  # vocabularies are ~10^5 tokens

# GGUF value type → struct format of a scalar; 8 (string) and 9 (array) are read separately.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class _Cursor:
    def __init__(self, file: BinaryIO, size: int, name: str):
        self.file, self.left, self.name = file, size, name

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise ExportError(f"{self.name} is not a complete GGUF file: it ends inside its metadata")
        self.left -= n
        return self.file.read(n)

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > MAX_STRING:
            raise ExportError(f"{self.name} declares a {n}-byte metadata string (limit {MAX_STRING})")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise ExportError(f"{self.name} has a metadata string that is not UTF-8") from None

    def value(self, kind: int, depth: int = 0):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY and depth == 0:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if count > MAX_ARRAY:
                raise ExportError(f"{self.name} declares a metadata array of {count} items (limit {MAX_ARRAY})")
            if item in SCALARS and count * struct.calcsize(SCALARS[item]) > self.left:
                raise ExportError(f"{self.name} is not a complete GGUF file: it ends inside its metadata")
            return [self.value(item, depth + 1) for _ in range(count)]
        raise ExportError(f"{self.name} has a metadata value of unknown type {kind}")


def read_metadata(path: str | os.PathLike) -> dict:
    """The key/value metadata of the GGUF file at `path` (`general.architecture`, `llama.block_count`, ...)."""
    name = os.fspath(path)
    try:
        file = open(path, "rb")  # noqa: SIM115 (opened before the with-block so only open() errors get these messages)
    except FileNotFoundError:
        raise ExportError(f"GGUF file {name} does not exist") from None
    except IsADirectoryError:
        raise ExportError(f"{name} is a directory, not a GGUF file") from None
    with file:
        cursor = _Cursor(file, os.fstat(file.fileno()).st_size, name)
        if cursor.left < 24 or cursor.take(4) != MAGIC:
            raise ExportError(f"{name} is not a GGUF file (no GGUF magic)")
        version = cursor.scalar("<I")
        if version not in VERSIONS:
            raise ExportError(f"{name} is GGUF version {version}; this reader knows versions {VERSIONS}")
        cursor.scalar("<Q")  # tensor count: the tensors are not read
        keys = cursor.scalar("<Q")
        if keys > MAX_KEYS:
            raise ExportError(f"{name} declares {keys} metadata keys (limit {MAX_KEYS})")
        metadata = {}
        for _ in range(keys):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        return metadata


def vocab_digest(tokens: list[str]) -> str:
    """sha256 of a vocabulary's token strings in id order: the same for a tokenizer and the GGUF made from it."""
    return hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode("utf-8")).hexdigest()
