"""Per-head numpy arrays of a `.kvc` cache, in memory (`load_file`) or as a safetensors file (`export_file`), for
runtimes that do not read `.kvc`.

For every layer `l` and KV head `h`:
    layers.{l}.heads.{h}.keys       (n, head_dim)  the keys as the model cached them (RoPE applied), dequantized
    layers.{l}.heads.{h}.values     (n, head_dim)  the values, dequantized
    layers.{l}.heads.{h}.positions  (n,) int32     the token position of each row, ascending
    layers.{l}.heads.{h}.bias       (n,)           only in layers that store one (format 1.5): the logit bias to add
                                                   to each row's attention score (float32, or the export dtype)
where n is the number of entries the head kept (every token for a dense cache; in a layer with a sliding window
(format 1.6), the positions it holds, `geometry.first_position(l)` … tokens − 1). Keys and values are float32 unless
asked otherwise. The safetensors metadata (strings) holds `kvc.format` (the file's format version), `kvc.layout`,
`layers`, `kv_heads`, `head_dim`, `tokens`, `kvc.windows` (only in a file with windows: the `cache.windows` array as
JSON, null for a full-attention layer), and `kvc.header`: the whole `.kvc` header as JSON (model fingerprint,
prompt token ids, settings).
"""

import json
import os
import struct
from collections.abc import Callable, Iterator

import numpy as np

from .atomic import AtomicFile
from .constants import bfloat16_to_float32
from .errors import ExportError, MetadataError, UnsupportedVersionError
from .reader import KvcReader, StoredArray, StoredLayer
from .rope import apply_rope

# export dtype → (safetensors dtype code, numpy dtype)
EXPORT_DTYPES = {"float32": ("F32", np.dtype("<f4")), "float16": ("F16", np.dtype("<f2"))}
NAMES = ("keys", "values", "positions")


def _float32(stored: StoredArray) -> np.ndarray:
    if stored.dtype == "bfloat16":
        return bfloat16_to_float32(stored.data)
    return stored.data.astype(np.float32, copy=False)


def _check_keys_recoverable(reader: KvcReader) -> None:
    g = reader.geometry
    if g.key_rope == "removed" and g.rope_inv_freq is None:
        major, minor = reader.version
        raise UnsupportedVersionError(
            f"this file (format {major}.{minor}) stores its keys without RoPE but not the RoPE frequencies needed "
            "to restore them without the model: load it with kvc, or compress the document again with kvc >= 0.4"
        )


def check_unwindowed(reader: KvcReader, runtime: str) -> None:
    """Refuse (ExportError) a file in which a sliding window leaves some layer fewer than `tokens` positions, for a
    runtime whose cache holds every position of the document in every layer."""
    g = reader.geometry
    short = [layer for layer in range(g.layers) if g.held(layer) < g.tokens]
    if short:
        layer = short[0]
        raise ExportError(f"layer {layer} has a sliding window of {g.windows[layer]} and holds only the last "
                          f"{g.held(layer)} of the {g.tokens} positions: sliding-window caches cannot be exported to "
                          f"{runtime} yet")


def _heads(reader: KvcReader, layer: int, stored: StoredLayer) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    g = reader.geometry
    keys, values = _float32(stored.keys), _float32(stored.values)
    if stored.positions is None:  # dense: row t is position first + t
        positions = np.arange(g.first_position(layer), g.tokens, dtype=np.int32)
        return [(keys[h], values[h], positions) for h in range(g.kv_heads)]
    if g.key_rope == "removed":
        with np.errstate(over="ignore", invalid="ignore"):
            keys = apply_rope(keys, np.concatenate(stored.positions), g.rope_inv_freq)
        if not np.isfinite(keys).all():
            raise MetadataError("keys overflow float32 when RoPE is applied")
    ends = np.cumsum([len(p) for p in stored.positions])
    starts = ends - [len(p) for p in stored.positions]
    return [(keys[a:b], values[a:b], p.astype(np.int32)) for a, b, p in zip(starts, ends, stored.positions,
                                                                           strict=True)]


def iter_layer_heads(reader: KvcReader) -> Iterator[tuple[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]]:
    """(layer, [(keys, values, positions) per KV head]) for every layer in order, a batch of layers at a time;
    keys and values float32 (n, head_dim) with RoPE applied, positions int32 (n,)."""
    _check_keys_recoverable(reader)
    reader.check_padding()  # as `verify` does: no checksum covers the padding
    for layer, stored in reader.iter_layers():
        yield layer, _heads(reader, layer, stored)


def iter_heads(reader: KvcReader) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """(layer, head, keys, values, positions) for every layer and KV head in order (see `iter_layer_heads`)."""
    for layer, heads in iter_layer_heads(reader):
        for head, (keys, values, positions) in enumerate(heads):
            yield layer, head, keys, values, positions


def head_biases(reader: KvcReader, layer: int) -> list[np.ndarray] | None:
    """The logit bias of `layer` split per KV head (float32 (n,) each), or None when the layer stores none."""
    bias = reader.read_bias(layer)
    if bias is None:
        return None
    return np.split(bias, np.cumsum(reader.head_counts(layer))[:-1])


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Decode a whole `.kvc` file into the named per-head arrays above (float32 keys, values and any bias)."""
    with KvcReader(path) as reader:
        out = {}
        for layer, heads in iter_layer_heads(reader):
            biases = head_biases(reader, layer)
            for head, (keys, values, positions) in enumerate(heads):
                prefix = f"layers.{layer}.heads.{head}."
                out.update({prefix + "keys": keys, prefix + "values": values, prefix + "positions": positions})
                if biases is not None:
                    out[prefix + "bias"] = biases[head]
        return out


def metadata(reader: KvcReader) -> dict[str, str]:
    g = reader.geometry
    meta = {"kvc.format": "{}.{}".format(*reader.version), "kvc.layout": g.layout, "layers": str(g.layers),
            "kv_heads": str(g.kv_heads), "head_dim": str(g.head_dim), "tokens": str(g.tokens)}
    if g.windows is not None:
        meta["kvc.windows"] = json.dumps(list(g.windows))
    meta["kvc.header"] = json.dumps(reader.header, ensure_ascii=False)
    return meta


def safetensors_header(entries: dict) -> bytes:
    """The bytes a safetensors file starts with: the header's length (u64), then `entries` (tensor name → dtype, shape
    and data_offsets; "__metadata__" → strings) as JSON, padded with spaces to a multiple of 8 bytes as safetensors
    does."""
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _safetensors_header(reader: KvcReader, dtype: str) -> bytes:
    """The safetensors header, from the per-head counts alone (before anything is dequantized)."""
    code, np_dtype = EXPORT_DTYPES[dtype]
    dim, entries, offset = reader.geometry.head_dim, {"__metadata__": metadata(reader)}, 0
    for layer in range(reader.geometry.layers):
        for head, n in enumerate(reader.head_counts(layer)):
            prefix = f"layers.{layer}.heads.{head}."
            tensors = [("keys", code, [n, dim], n * dim * np_dtype.itemsize),
                       ("values", code, [n, dim], n * dim * np_dtype.itemsize), ("positions", "I32", [n], 4 * n)]
            if layer in reader.bias_layers:
                tensors.append(("bias", code, [n], n * np_dtype.itemsize))
            for name, kind, shape, size in tensors:
                entries[prefix + name] = {"dtype": kind, "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
    return safetensors_header(entries)


def export_file(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float32",
                on_layer: Callable[[int], None] | None = None) -> int:
    """Write `src` (.kvc) as a safetensors file at `dst`, atomically and a batch of layers at a time. Every
    section's checksum is verified on the way. `on_layer(layer)` is called as each layer is written. Returns the
    bytes written."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(EXPORT_DTYPES)}, not {dtype!r}")
    np_dtype = EXPORT_DTYPES[dtype][1]
    with KvcReader(src) as reader:
        _check_keys_recoverable(reader)
        header = _safetensors_header(reader, dtype)
        out = AtomicFile(dst)
        try:
            out.file.write(header)
            written = len(header)
            for layer, heads in iter_layer_heads(reader):
                biases = head_biases(reader, layer)
                for head, (keys, values, positions) in enumerate(heads):
                    arrays = [keys.astype(np_dtype), values.astype(np_dtype), positions.astype("<i4")]
                    if biases is not None:
                        arrays.append(biases[head].astype(np_dtype))
                    for array in arrays:
                        out.file.write(np.ascontiguousarray(array).data)
                        written += array.nbytes
                if on_layer is not None:
                    on_layer(layer)
            out.commit()
        except BaseException:
            out.discard()
            raise
        return written
