"""A `.kvc` cache as a llama.cpp sequence-state file: what `llama_state_seq_save_file` writes and
`llama_state_seq_load_file` reads (node-llama-cpp: `sequence.loadStateFromFile`), so llama.cpp answers from the
cache with no prefill.

Written for the llama.cpp that node-llama-cpp 3.21.1 bundles (its release v0.4.0, state-file version 3), the build
the tests run; llama.cpp changed this layout without a version bump before, so other builds may refuse the file.
Little-endian, no padding:

    u32 magic 'ggsq' (0x67677371) · u32 version (3) · u32 n_tokens · i32 token ids (every cached token)
    u32 n_stream (1) · u32 cell_count · per cell {i32 pos, u32 n_seq_id (1), i32 seq_id (0)}
    u32 v_trans · u32 n_layer
    per layer, K: i32 ggml type · u64 row bytes · cell_count rows of kv_heads × head_dim
    per layer, V: the same when v_trans is 0; else i32 type · u32 element bytes · u32 kv_heads × head_dim, then for
                  each of those dimensions its cell_count elements

K is stored after RoPE, in llama.cpp's channel order: its GGUF conversion of LLaMA-family models permutes `k_proj`
so that within a head channel 2j holds Hugging Face's channel j and 2j+1 holds j + head_dim/2. V is not permuted.
In a quantized cache (q8_0) llama.cpp stores K and V rotated by a 64-wide
Walsh-Hadamard matrix per head (and rotates queries and outputs to match); the export does the same.
A cell holds one position for every layer and head, and the mask compares positions, so a cache with gaps works
(new tokens go at the largest position + 1); a cache pruned per head cannot be held, nor (yet) one whose
sliding-window layers (format 1.6) hold fewer positions than the others.

llama.cpp checks the layer count, the types, the row sizes and `v_trans` against its context, and nothing about
the model: `check_model` compares the `.kvc`'s recorded model with the GGUF file the runtime will load.
"""

import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .atomic import AtomicFile
from .errors import ExportError
from .export import check_unwindowed, iter_layer_heads
from .gguf import read_metadata, vocab_digest
from .reader import KvcReader

RUNTIME = "llama.cpp v0.4.0 (node-llama-cpp 3.21.1)"
MAGIC = 0x67677371  # 'ggsq'
STATE_VERSION = 3
GGML_F16, GGML_Q8_0 = 1, 8
CACHE_TYPES = {"f16": GGML_F16, "q8_0": GGML_Q8_0}
Q8_0_BLOCK = 32
# GGUF architectures whose conversion permutes k_proj (llama.cpp's "normal" RoPE over interleaved pairs). Others
# (NeoX RoPE: qwen2, phi3, ...) keep Hugging Face's order, but no such runtime file has been checked against one.
PERMUTED_ARCHITECTURES = {"llama"}


@dataclass(frozen=True)
class StateInfo:
    """What was written: for `--json` and the caller's report."""

    runtime: str
    state_version: int
    tokens: int
    cells: int
    cache_type: str
    v_trans: bool
    bytes: int


def _hf_to_llama_order(head_dim: int) -> np.ndarray:
    """Source channel for each llama.cpp channel of a head: 2j ← j, 2j+1 ← j + head_dim/2."""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


def _hadamard(n: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix of size n (Sylvester order), as llama.cpp builds it."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def _rotated(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """llama.cpp rotates K and V by a 64-wide Hadamard matrix per head before storing them in a quantized cache
    (`attn_rot_k` / `attn_rot_v`, on when the type is quantized and head_dim % 64 == 0; queries and outputs are
    rotated to match), so its quantization error spreads evenly over the channels."""
    n, width = rows.shape
    return (rows.reshape(n, width // 64, 64) @ _hadamard(64)).reshape(n, width)


def _q8_0_rows(rows: np.ndarray) -> bytes:
    """(n, width) float32 → ggml Q8_0 rows: blocks of 32 as {f16 scale d = max|x| / 127, 32 × int8 round(x / d)}."""
    n, width = rows.shape
    blocks = rows.reshape(n, width // Q8_0_BLOCK, Q8_0_BLOCK)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    quantized = np.clip(np.rint(blocks * inverse), -127, 127).astype(np.int8)
    packed = np.empty((n, width // Q8_0_BLOCK, 2 + Q8_0_BLOCK), np.uint8)
    packed[..., :2] = scale.astype("<f2").view(np.uint8)
    packed[..., 2:] = quantized.view(np.uint8)
    return packed.tobytes()


def _row_bytes(cache_type: str, width: int) -> int:
    return 2 * width if cache_type == "f16" else width // Q8_0_BLOCK * (2 + Q8_0_BLOCK)


def _encode(rows: np.ndarray, cache_type: str, head_dim: int) -> bytes:
    if cache_type == "f16":
        return rows.astype("<f2").tobytes()
    return _q8_0_rows(_rotated(rows, head_dim) if head_dim % 64 == 0 else rows)


def check_model(header: dict, gguf_path: str | os.PathLike) -> dict:
    """Refuse (ExportError) a GGUF model that is not the one the `.kvc` was computed with, as far as a GGUF can
    tell: architecture, geometry, RoPE base, context length and the vocabulary's token strings. The weights cannot
    be compared (the GGUF's are quantized differently). Returns the GGUF's metadata."""
    meta = read_metadata(gguf_path)
    model, tokens = header["model"], len(header["prompt"]["prefix_ids"])
    arch = meta.get("general.architecture")
    if arch not in PERMUTED_ARCHITECTURES or model.get("model_type") != arch:
        raise ExportError(f"llama.cpp export supports the llama architecture (checked in the runtime); the .kvc "
                          f"holds {model.get('model_type')!r} and the GGUF is {arch!r}")
    heads = meta.get(f"{arch}.attention.head_count")
    expected = {
        "layers": (model.get("num_layers"), meta.get(f"{arch}.block_count")),
        "attention heads": (model.get("num_attention_heads"), heads),
        "KV heads": (model.get("num_kv_heads"), meta.get(f"{arch}.attention.head_count_kv")),
        "hidden size": (model.get("hidden_size"), meta.get(f"{arch}.embedding_length")),
        "head size": (model.get("head_dim"), meta.get(f"{arch}.attention.key_length",
                                                      meta.get(f"{arch}.embedding_length", 0) // (heads or 1))),
        "rotary dimensions": (model.get("head_dim"), meta.get(f"{arch}.rope.dimension_count")),
    }
    for what, (ours, theirs) in expected.items():
        if ours != theirs:
            raise ExportError(f"the GGUF model does not match the .kvc's: {what} {theirs} in {gguf_path}, "
                              f"{ours} in the .kvc")
    rope = model.get("rope") or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"llama.cpp export supports plain RoPE; this model uses {rope.get('rope_type')!r} scaling")
    base = meta.get(f"{arch}.rope.freq_base", 10000.0)
    if rope.get("rope_theta") is None or not math.isclose(rope["rope_theta"], base, rel_tol=1e-6):
        raise ExportError(f"the GGUF model's RoPE base is {base}, the .kvc's {rope.get('rope_theta')}")
    context = meta.get(f"{arch}.context_length", 0)
    if tokens >= context:
        raise ExportError(f"the .kvc holds {tokens} tokens; the GGUF model's context is {context}")
    vocab, gguf_tokens = model.get("vocab"), meta.get("tokenizer.ggml.tokens") or []
    if vocab is None:
        raise ExportError("this .kvc records no vocabulary digest (made by kvc < 0.6), so the GGUF's tokens "
                          "cannot be checked: compress the document again with this kvc")
    if len(gguf_tokens) < vocab["count"] or vocab_digest(gguf_tokens[: vocab["count"]]) != vocab["sha256"]:
        raise ExportError(f"the GGUF model's vocabulary differs from the tokenizer the .kvc was made with "
                          f"({gguf_path})")
    return meta


def _per_head_pruned() -> ExportError:
    return ExportError("this file is pruned per head, and a llama.cpp cell holds one position for every layer and "
                       "head: compress with --allocation position to export a pruned cache to llama.cpp")


def _cells(positions: np.ndarray) -> bytes:
    """n_stream (1), the cell count and each cell {pos, n_seq_id = 1, seq_id = 0}."""
    meta = np.zeros((len(positions), 3), dtype="<i4")
    meta[:, 0], meta[:, 1] = positions, 1
    return struct.pack("<II", 1, len(positions)) + meta.tobytes()


def export_llama_cpp(src: str | os.PathLike, dst: str | os.PathLike, gguf: str | os.PathLike, *,
                     cache_type: str = "f16", v_trans: bool = False,
                     on_layer: Callable[[int], None] | None = None) -> StateInfo:
    """Write `src` (.kvc) as a llama.cpp sequence-state file at `dst`, atomically and a layer at a time, after
    checking it against the GGUF model the runtime will load. `v_trans` must be the runtime context's: True when
    flash attention is off. `cache_type` is the context's K/V type, "f16" (llama.cpp's default) or "q8_0" (only
    with `v_trans` False). `on_layer(layer)` is called as each layer's keys are written."""
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"cache type must be one of {sorted(CACHE_TYPES)}, not {cache_type!r}")
    if cache_type != "f16" and v_trans:
        raise ExportError("llama.cpp holds quantized V only untransposed: q8_0 needs flash attention on")
    with KvcReader(src) as reader:
        g, header = reader.geometry, reader.header
        check_unwindowed(reader, "llama.cpp")  # cells are shared by all layers
        check_model(header, gguf)
        if len({n for layer in range(g.layers) for n in reader.head_counts(layer)}) > 1:
            raise _per_head_pruned()
        width = g.kv_heads * g.head_dim
        if cache_type == "q8_0" and width % Q8_0_BLOCK:
            raise ExportError(f"q8_0 needs rows of a multiple of {Q8_0_BLOCK} elements; this model's are {width}")
        order = _hf_to_llama_order(g.head_dim)
        prefix_ids = np.asarray(header["prompt"]["prefix_ids"], dtype="<i4")
        row_bytes = _row_bytes(cache_type, width)
        out = AtomicFile(dst)
        try:
            out.file.write(struct.pack("<III", MAGIC, STATE_VERSION, len(prefix_ids)) + prefix_ids.tobytes())
            cells, values = None, []  # every layer's K comes before the first layer's V: V waits, encoded
            for layer, heads in iter_layer_heads(reader):
                if cells is None:
                    cells = heads[0][2]
                    out.file.write(_cells(cells) + struct.pack("<II", int(v_trans), g.layers))
                if any(not np.array_equal(positions, cells) for _, _, positions in heads):
                    raise _per_head_pruned()
                if layer in reader.bias_layers:
                    raise ExportError("this file stores a logit bias per kept entry, which llama.cpp's attention has "
                                      "no place to add: compress with --no-logit-bias to export it")
                keys = np.concatenate([k[:, order] for k, _, _ in heads], axis=1)
                out.file.write(struct.pack("<iQ", CACHE_TYPES[cache_type], row_bytes))
                out.file.write(_encode(keys, cache_type, g.head_dim))
                rows = np.concatenate([v for _, v, _ in heads], axis=1)
                values.append(rows.T.astype("<f2").tobytes() if v_trans else _encode(rows, cache_type, g.head_dim))
                if on_layer is not None:
                    on_layer(layer)
            for encoded in values:
                if v_trans:
                    out.file.write(struct.pack("<iII", GGML_F16, 2, width) + encoded)
                else:
                    out.file.write(struct.pack("<iQ", CACHE_TYPES[cache_type], row_bytes) + encoded)
            written = out.file.tell()
            out.commit()
        except BaseException:
            out.discard()
            raise
    return StateInfo(RUNTIME, STATE_VERSION, len(prefix_ids), len(cells), cache_type, v_trans, written)
