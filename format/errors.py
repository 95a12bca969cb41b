"""Typed errors raised by the `.kvc` reader and writer. Every failure is one of these; nothing is asserted."""


class KvcFormatError(Exception):
    """Base class: the bytes are not a valid `.kvc` file (or cannot be written as one)."""


class BadMagicError(KvcFormatError):
    """The file does not start (or end) with the `.kvc` magic bytes."""


class UnsupportedVersionError(KvcFormatError):
    """The file needs a newer reader (major version, byte order, or an unknown required section)."""


class TruncatedError(KvcFormatError):
    """The file ends before a structure it declares."""


class ChecksumError(KvcFormatError):
    """A CRC-32 over the header, the index or a section does not match its bytes."""


class MetadataError(KvcFormatError):
    """The msgpack header or index is malformed: bad types, duplicate keys, missing or out-of-range fields."""


class LayoutError(KvcFormatError):
    """Sections or streams have holes, overlaps, bad alignment, trailing bytes or out-of-bounds offsets, or a section
    type does not match the cache layout."""


class LimitError(KvcFormatError):
    """A declared size or count exceeds what this reader accepts or what the file can hold."""


class CodecError(KvcFormatError):
    """A stream's codec is unknown, or its payload does not decode to exactly the declared size."""


class ExportError(Exception):
    """A valid `.kvc` file that cannot be converted to the requested runtime's cache file (a pruned cache for a
    runtime without gaps, a model the runtime file does not match, an unsupported architecture). Not a
    `KvcFormatError`: the file itself is fine."""
