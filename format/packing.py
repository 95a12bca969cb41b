"""Strict msgpack for the header and the index: string keys, no duplicates, no trailing bytes, no extensions."""

import msgpack

from .errors import MetadataError


def _unique_map(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise MetadataError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_ext(code: int, data: bytes):
    raise MetadataError(f"msgpack extension type {code} is not allowed")


def pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=False)


def unpack_map(data: bytes, what: str) -> dict:
    """Decode exactly one msgpack map occupying all of `data`."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_unique_map,
            ext_hook=_no_ext,
            use_list=True,
        )
    except MetadataError as exc:
        raise MetadataError(f"{what}: {exc}") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise MetadataError(f"{what} is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise MetadataError(f"{what} is not a msgpack map")
    for key in obj:
        if not isinstance(key, str):
            raise MetadataError(f"{what} has a non-string key")
    return obj
