"""`kvc compress`: document → chunked prefill → per-layer KV streams → `.kvc` file (written atomically)."""

import hashlib
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import DynamicCache

from kvc_format import KvcWriter, Stream, encode_positions

from . import __version__
from .budget import check_allocation, check_ratio, protected_positions
from .devices import DTYPE_NAMES
from .document import PromptLayout, layout_prompt, read_document
from .errors import KvcError
from .fingerprint import fingerprint
from .models import EMBEDDED, LoadedModel, load_model
from .prefill import prefill
from .progress import TaskFactory, progress_bars, silent_task
from .pruning import Pruning, score_context
from .scorers import DEFAULT_SCORER, check_scorer
from .tensors import storage_tensor, to_stream

CODECS = ("raw", "zstd")
DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class CompressResult:
    output: str
    model: str
    tokens: int
    kept_ratio: float
    raw_bytes: int  # the full context KV in fp16: 2 × layers × kv_heads × head_dim × tokens × 2
    file_bytes: int
    compression: float
    seconds: float
    prefill_seconds: float
    codec: str
    bits: int
    scorer: str | None = None  # None when nothing was pruned
    allocation: str | None = None
    score_seconds: float = 0.0

    def as_json(self) -> dict:
        return asdict(self)


def raw_fp16_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int) -> int:
    return 2 * layers * kv_heads * head_dim * tokens * 2


def _check_settings(codec: str, ratio: float, bits: int, chunk_size: int, scorer: str,
                    allocation: str | None) -> None:
    if codec not in CODECS:
        raise KvcError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
    if not 0 < ratio <= 1:
        raise KvcError(f"--ratio {ratio} is out of range: it is the kept fraction, 0 < ratio <= 1")
    check_scorer(scorer)
    if allocation is not None:
        check_allocation(allocation)
    if bits not in (16, 32):
        raise KvcError(f"--bits {bits}: this version stores 16-bit (default) or 32-bit floats; quantization "
                       "to fewer bits is not available yet")
    if chunk_size < 1:
        raise KvcError(f"--chunk-size {chunk_size} must be at least 1")


@dataclass
class Prefilled:
    """A document's full KV cache, computed once; `write_kvc` can store it under any number of settings."""

    lm: LoadedModel
    text: str
    layout: PromptLayout
    cache: DynamicCache
    identity: dict
    prefill_seconds: float
    chunk_size: int

    @property
    def tokens(self) -> int:
        return len(self.layout.prefix_ids)


def prefill_document(text: str, lm: LoadedModel, chunk_size: int = DEFAULT_CHUNK,
                     task: TaskFactory = silent_task) -> Prefilled:
    """Lay `text` out as a prompt prefix and prefill it in chunks."""
    layout = layout_prompt(lm.tokenizer, text)
    tokens = len(layout.prefix_ids)
    limit = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    if limit and tokens >= limit:
        raise KvcError(f"the document is {tokens} tokens; model {lm.name!r} handles at most {limit}")
    identity = fingerprint(lm.model, lm.tokenizer)
    started = time.perf_counter()
    cache = prefill(lm.model, layout.prefix_ids, chunk_size, task("prefill", tokens))
    return Prefilled(lm, text, layout, cache, identity, time.perf_counter() - started, chunk_size)


def check_output(output: Path) -> None:
    if output.is_dir():
        raise KvcError(f"output {output} is a directory")
    if not output.parent.is_dir():
        raise KvcError(f"output folder {output.parent} does not exist")


def _header(pre: Prefilled, bits: int, codec: str, pruning: Pruning | None) -> dict:
    cache, identity, layout = pre.cache, pre.identity, pre.layout
    geometry = {
        "layout": "dense" if pruning is None else "pruned",
        "layers": len(cache.layers),
        "kv_heads": identity["num_kv_heads"],
        "tokens": pre.tokens,
        "head_dim": identity["head_dim"],
        "computed_dtype": DTYPE_NAMES[cache.layers[0].keys.dtype],
    }
    settings = {"ratio": 1.0, "kept_ratio": 1.0, "scorer": None, "allocation": None, "bits": bits, "codec": codec,
                "chunk_size": pre.chunk_size}
    if pruning is not None:
        geometry["kept"] = int(pruning.keep.sum())
        settings.update(ratio=pruning.ratio, kept_ratio=pruning.kept_ratio, scorer=pruning.scorer,
                        allocation=pruning.allocation)
    return {
        "kvc": {"writer": f"kvc {__version__}"},
        "model": {**identity, "name": pre.lm.name, "dtype": DTYPE_NAMES[pre.lm.model.dtype]},
        "cache": geometry,
        "prompt": {
            "template": layout.template,
            "prefix_ids": layout.prefix_ids,
            "question_prefix": layout.question_prefix,
            "question_suffix": layout.question_suffix,
        },
        "document": {"chars": len(pre.text), "sha256": hashlib.sha256(pre.text.encode()).hexdigest()},
        "settings": settings,
        "timings": {"prefill_seconds": pre.prefill_seconds, "device": str(pre.lm.model.device)},
    }


def _pruned_streams(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, bits: int) -> list[Stream]:
    """keys/values (kv_heads, tokens, head_dim), keep (kv_heads, tokens) → the kv_layer_pruned streams."""
    positions = [row.nonzero().squeeze(-1) for row in keep.cpu()]
    counts, gaps = encode_positions([p.numpy() for p in positions])
    kept_keys = torch.cat([keys[h, p.to(keys.device)] for h, p in enumerate(positions)])
    kept_values = torch.cat([values[h, p.to(values.device)] for h, p in enumerate(positions)])
    return [
        Stream("counts", "int32", tuple(counts.shape), memoryview(counts).cast("B"), codec="zstd"),
        Stream("positions", "int32", tuple(gaps.shape), memoryview(gaps).cast("B"), codec="zstd"),
        to_stream("keys", storage_tensor(kept_keys, bits)),
        to_stream("values", storage_tensor(kept_values, bits)),
    ]


def write_kvc(pre: Prefilled, output: str | os.PathLike, *, codec: str = "zstd", bits: int = 16,
              pruning: Pruning | None = None, task: TaskFactory = silent_task) -> CompressResult:
    """Store a prefilled cache in `output` (atomically), pruned to `pruning.keep` when given.

    `seconds` counts the prefill, the scoring and the write.
    """
    output = Path(output)
    check_output(output)
    started = time.perf_counter()
    cache, identity = pre.cache, pre.identity
    computed = cache.layers[0].keys.dtype
    if bits == 32 and computed != torch.float32:
        raise KvcError(f"--bits 32 keeps float32 KV, but the model computed {DTYPE_NAMES[computed]}; "
                       "use --bits 16 or --dtype float32")
    advance = task("write", len(cache.layers))
    with KvcWriter(output, _header(pre, bits, codec, pruning)) as writer:
        for i, layer in enumerate(cache.layers):
            keys, values = layer.keys[0], layer.values[0]
            if pruning is None:
                streams = [to_stream("keys", storage_tensor(keys, bits)),
                           to_stream("values", storage_tensor(values, bits))]
                writer.add_section("kv_layer", {"layer": i}, streams, codec=codec)
            else:
                kept = int(pruning.keep[i].sum())
                streams = _pruned_streams(keys, values, pruning.keep[i], bits)
                writer.add_section("kv_layer_pruned", {"layer": i, "kept": kept}, streams, codec=codec)
            advance(1)
    file_bytes = output.stat().st_size
    raw = raw_fp16_bytes(len(cache.layers), identity["num_kv_heads"], identity["head_dim"], pre.tokens)
    score_seconds = pruning.score_seconds if pruning else 0.0
    return CompressResult(
        output=str(output),
        model=pre.lm.name,
        tokens=pre.tokens,
        kept_ratio=pruning.kept_ratio if pruning else 1.0,
        raw_bytes=raw,
        file_bytes=file_bytes,
        compression=raw / file_bytes,
        seconds=pre.prefill_seconds + score_seconds + time.perf_counter() - started,
        prefill_seconds=pre.prefill_seconds,
        codec=codec,
        bits=bits,
        scorer=pruning.scorer if pruning else None,
        allocation=pruning.allocation if pruning else None,
        score_seconds=score_seconds,
    )


def compress_text(
    text: str,
    output: str | os.PathLike,
    *,
    model: str | LoadedModel = EMBEDDED,
    codec: str = "zstd",
    ratio: float = 1.0,
    scorer: str = DEFAULT_SCORER,
    allocation: str | None = None,
    bits: int = 16,
    chunk_size: int = DEFAULT_CHUNK,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
) -> CompressResult:
    """Prefill `text` as a reusable prompt prefix and store its KV cache in `output`.

    With `ratio` < 1, `scorer` rates every entry without knowing any question and `allocation` ("global", "layer"
    or "head"; default: the scorer's own) spreads the kept `ratio` of entries over layers and heads.
    """
    _check_settings(codec, ratio, bits, chunk_size, scorer, allocation)
    check_output(Path(output))
    started = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    with progress_bars(progress) as task:
        pre = prefill_document(text, lm, chunk_size, task)
        pruning = None
        if ratio < 1:
            check_ratio(ratio, protected_positions(pre.layout))  # before the costly scoring
            pruning = score_context(lm, pre.cache, pre.layout, scorer, task).keep(ratio, allocation)
        result = write_kvc(pre, output, codec=codec, bits=bits, pruning=pruning, task=task)
    return replace(result, seconds=time.perf_counter() - started)


def compress(document: str | os.PathLike, output: str | os.PathLike, **options) -> CompressResult:
    """Like `kvc compress DOC -o OUTPUT`: `document` is a UTF-8 text file, or "-" for stdin."""
    return compress_text(read_document(os.fspath(document)), output, **options)
