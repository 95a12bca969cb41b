"""A `.kvc` cache as an MLX-LM prompt-cache file: what `mlx_lm.models.cache.save_prompt_cache` writes and
`load_prompt_cache` reads (`mlx_lm.generate --prompt-cache-file`), so MLX-LM answers from the cache with no prefill.

Written for mlx-lm 0.32.2 (the version the tests run), whose `KVCache` state is (keys, values, offset);
`save_prompt_cache` flattens the states, then [user metadata, cache class names, scalars to restore], with
`mlx.utils.tree_flatten` into one safetensors file:

    tensors   "{layer}.0"    keys    (1, kv_heads, tokens, head_dim), RoPE applied, Hugging Face channel order
              "{layer}.1"    values  (1, kv_heads, tokens, head_dim)
              "{layer}.2"    offset  int32 scalar: the tokens held
    metadata  "0.{key}"      user metadata: "model" (the model MLX-LM loads; `mlx_lm.generate` refuses a different
                             --model) and "tokenizer_config" (JSON), as `mlx_lm.cache_prompt` writes them
              "1.{layer}"    "KVCache", the class `load_prompt_cache` rebuilds
              "2.0"          "", then for i = 1..layers "2.{i}.0" = "{i-1}.2" and "2.{i}.1" = "scalar": the
                             offsets are stored as arrays and turned back into ints on loading

`save_prompt_cache` writes a KVCache's whole buffer (it grows 256 tokens at a time, zeros past the offset); this
writes the tokens alone, which loads the same: the next token goes at the offset either way.

MLX-LM's cache has no positions: entry i is token i, so only a cache that keeps every token of every head can be
written (dense, or quantized at --ratio 1), and not one whose sliding-window layers (format 1.6) hold only the last
positions of the document.
"""

import json
import os

import numpy as np

from .atomic import AtomicFile
from .errors import ExportError
from .export import EXPORT_DTYPES, check_unwindowed, iter_layer_heads, safetensors_header
from .reader import KvcReader

CACHE_CLASS = "KVCache"
# What `mlx_lm.cache_prompt` records when run without --trust-remote-code or --eos-token.
DEFAULT_TOKENIZER_CONFIG = {"trust_remote_code": False}


def _check_dense(reader: KvcReader) -> None:
    check_unwindowed(reader, "MLX-LM")  # first: a windowed layer would otherwise be called pruned
    g = reader.geometry
    if any(kept != g.kv_heads * g.tokens for kept in reader.kept_per_layer()):
        raise ExportError("this .kvc is pruned and MLX-LM's cache has no gaps: export a file compressed with "
                          "--ratio 1 (or compress with --allocation position and export to llama.cpp)")
    if reader.bias_layers:
        raise ExportError("this .kvc stores a logit bias per kept entry, which MLX-LM's attention has no place to "
                          "add: export a file compressed with --ratio 1")


def _metadata(layers: int, user: dict[str, str]) -> dict[str, str]:
    """`save_prompt_cache`'s metadata: tree_flatten([user, ["KVCache", ...], ["", ("0.2", "scalar"), ...]])."""
    meta = {f"0.{key}": value for key, value in user.items()}
    meta.update({f"1.{layer}": CACHE_CLASS for layer in range(layers)})
    meta["2.0"] = ""
    for layer in range(layers):
        meta[f"2.{layer + 1}.0"] = f"{layer}.2"
        meta[f"2.{layer + 1}.1"] = "scalar"
    return meta


def _header(reader: KvcReader, dtype: str, user: dict[str, str]) -> bytes:
    g = reader.geometry
    code, np_dtype = EXPORT_DTYPES[dtype]
    shape = [1, g.kv_heads, g.tokens, g.head_dim]
    size = g.kv_heads * g.tokens * g.head_dim * np_dtype.itemsize
    entries, offset = {"__metadata__": _metadata(g.layers, user)}, 0
    for layer in range(g.layers):  # the data in layer order; the header's keys sorted as MLX writes them
        for name, kind, dims, n in (("0", code, shape, size), ("1", code, shape, size), ("2", "I32", [], 4)):
            entries[f"{layer}.{name}"] = {"dtype": kind, "shape": dims, "data_offsets": [offset, offset + n]}
            offset += n
    return safetensors_header(dict(sorted(entries.items())))


def _cast(rows: np.ndarray, np_dtype: np.dtype, layer: int) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow is refused just below
        out = rows.astype(np_dtype)
    if np.count_nonzero(np.isinf(out)) > np.count_nonzero(np.isinf(rows)):
        raise ExportError(f"layer {layer} holds values beyond float16's range (65504): export with dtype float32")
    return out


def export_mlx(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "float16", model: str | None = None,
               tokenizer_config: dict | None = None) -> int:
    """Write `src` (.kvc) as an MLX-LM prompt-cache file at `dst`, atomically and a batch of layers at a time,
    refusing a damaged file as `KvcReader.verify` does (structure, padding, every section's checksum as it is read)
    and a pruned one, or one whose sliding windows leave a layer fewer than every position, with `ExportError`.
    `model` is the path or Hugging Face repo MLX-LM is to load (default: the model name the `.kvc` records);
    `tokenizer_config` its tokenizer options (default: cache_prompt's). Keys and values are float16 (exactly a
    lossless `.kvc`'s 16-bit floats; from 4-bit files the same answers as float32 in MLX-LM,
    studies/edge/results/edge-mlx.md) or float32. Returns the bytes written."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(EXPORT_DTYPES)}, not {dtype!r}")
    np_dtype = EXPORT_DTYPES[dtype][1]
    with KvcReader(src) as reader:
        _check_dense(reader)
        g = reader.geometry
        user = {"model": model if model is not None else str(reader.header["model"].get("name", "")),
                "tokenizer_config": json.dumps(DEFAULT_TOKENIZER_CONFIG if tokenizer_config is None
                                               else tokenizer_config)}
        header = _header(reader, dtype, user)
        out = AtomicFile(dst)
        try:
            out.file.write(header)
            for layer, heads in iter_layer_heads(reader):
                for part in (0, 1):  # keys, then values: (kv_heads, tokens, head_dim) with a batch axis in front
                    out.file.write(_cast(np.stack([head[part] for head in heads])[None], np_dtype, layer).data)
                out.file.write(np.array(g.tokens, "<i4").tobytes())
            written = out.file.tell()
            out.commit()
        except BaseException:
            out.discard()
            raise
    return written
