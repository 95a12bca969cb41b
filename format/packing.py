"""Strict msgpack for the header and the index: string keys, no duplicates, no trailing bytes, no extensions."""

import msgpack

from .errors import MetadataError


def _checked(value):
    # msgpack decodes extension type -1 (timestamps) itself, without calling ext_hook.
    if isinstance(value, msgpack.Timestamp):
        raise MetadataError("msgpack extension type -1 (timestamp) is not allowed")
    return value


def _unique_map(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if type(key) is not str:  # strict_map_key still lets bytes keys through
            raise MetadataError(f"map key {key!r} is not a string")
        if key in out:
            raise MetadataError(f"duplicate key {key!r}")
        out[key] = _checked(value)
    return out


def _checked_list(items: list) -> list:
    for item in items:
        _checked(item)
    return items


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
            list_hook=_checked_list,
            use_list=True,
        )
    except MetadataError as exc:
        raise MetadataError(f"{what}: {exc}") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise MetadataError(f"{what} is not valid msgpack: {str(exc) or type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise MetadataError(f"{what} is not a msgpack map")
    return obj
