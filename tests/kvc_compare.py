"""Two .kvc files that hold the same cache: the same bytes after the header (every section, the padding, the index,
the footer) and the same header but for its measured timings (`timings.prefill_seconds` differs between any two
runs, so two whole files are never equal)."""

import struct
from pathlib import Path

from kvc_format import KvcReader
from kvc_format.constants import HEADER_PREFIX_SIZE, PREAMBLE_SIZE

MEASURED = "timings"


def contents(path: Path) -> tuple[dict, bytes]:
    """The header without its measured timings, and every byte after the header."""
    data = Path(path).read_bytes()
    (header_length,) = struct.unpack_from("<I", data, PREAMBLE_SIZE)
    with KvcReader(path) as reader:
        header = {k: v for k, v in reader.header.items() if k != MEASURED}
    return header, data[PREAMBLE_SIZE + HEADER_PREFIX_SIZE + header_length :]


def assert_same_cache(a: Path, b: Path) -> None:
    header_a, body_a = contents(a)
    header_b, body_b = contents(b)
    assert header_a == header_b
    assert body_a == body_b
