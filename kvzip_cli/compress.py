"""`kvc compress`: document → chunked prefill → per-layer KV streams → `.kvc` file (written atomically)."""

import hashlib
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import DynamicCache

from kvc_format import KvcWriter

from . import __version__
from .devices import DTYPE_NAMES
from .document import PromptLayout, layout_prompt, read_document
from .errors import KvcError
from .fingerprint import fingerprint
from .models import EMBEDDED, LoadedModel, load_model
from .prefill import prefill
from .progress import TaskFactory, progress_bars, silent_task
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

    def as_json(self) -> dict:
        return asdict(self)


def raw_fp16_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int) -> int:
    return 2 * layers * kv_heads * head_dim * tokens * 2


def _check_settings(codec: str, ratio: float, bits: int, chunk_size: int) -> None:
    if codec not in CODECS:
        raise KvcError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
    if not 0 < ratio <= 1:
        raise KvcError(f"--ratio {ratio} is out of range: it is the kept fraction, 0 < ratio <= 1")
    if ratio != 1:
        raise KvcError("pruning (--ratio below 1) is not available in this version of kvc; use --ratio 1")
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


def write_kvc(pre: Prefilled, output: str | os.PathLike, *, codec: str = "zstd", bits: int = 16,
              task: TaskFactory = silent_task) -> CompressResult:
    """Store a prefilled cache in `output` (atomically). `seconds` counts the prefill and the write."""
    output = Path(output)
    check_output(output)
    started = time.perf_counter()
    cache, identity, layout = pre.cache, pre.identity, pre.layout
    computed = cache.layers[0].keys.dtype
    if bits == 32 and computed != torch.float32:
        raise KvcError(f"--bits 32 keeps float32 KV, but the model computed {DTYPE_NAMES[computed]}; "
                       "use --bits 16 or --dtype float32")
    header = {
        "kvc": {"writer": f"kvc {__version__}"},
        "model": {**identity, "name": pre.lm.name, "dtype": DTYPE_NAMES[pre.lm.model.dtype]},
        "cache": {
            "layout": "dense",
            "layers": len(cache.layers),
            "kv_heads": identity["num_kv_heads"],
            "tokens": pre.tokens,
            "head_dim": identity["head_dim"],
            "computed_dtype": DTYPE_NAMES[computed],
        },
        "prompt": {
            "template": layout.template,
            "prefix_ids": layout.prefix_ids,
            "question_prefix": layout.question_prefix,
            "question_suffix": layout.question_suffix,
        },
        "document": {"chars": len(pre.text), "sha256": hashlib.sha256(pre.text.encode()).hexdigest()},
        "settings": {"ratio": 1.0, "scorer": None, "bits": bits, "codec": codec, "chunk_size": pre.chunk_size},
        "timings": {"prefill_seconds": pre.prefill_seconds, "device": str(pre.lm.model.device)},
    }
    advance = task("write", len(cache.layers))
    with KvcWriter(output, header) as writer:
        for i, layer in enumerate(cache.layers):
            streams = [
                to_stream("keys", storage_tensor(layer.keys[0], bits)),
                to_stream("values", storage_tensor(layer.values[0], bits)),
            ]
            writer.add_section("kv_layer", {"layer": i}, streams, codec=codec)
            advance(1)
    file_bytes = output.stat().st_size
    raw = raw_fp16_bytes(len(cache.layers), identity["num_kv_heads"], identity["head_dim"], pre.tokens)
    return CompressResult(
        output=str(output),
        model=pre.lm.name,
        tokens=pre.tokens,
        kept_ratio=1.0,
        raw_bytes=raw,
        file_bytes=file_bytes,
        compression=raw / file_bytes,
        seconds=pre.prefill_seconds + time.perf_counter() - started,
        prefill_seconds=pre.prefill_seconds,
        codec=codec,
        bits=bits,
    )


def compress_text(
    text: str,
    output: str | os.PathLike,
    *,
    model: str | LoadedModel = EMBEDDED,
    codec: str = "zstd",
    ratio: float = 1.0,
    bits: int = 16,
    chunk_size: int = DEFAULT_CHUNK,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
) -> CompressResult:
    """Prefill `text` as a reusable prompt prefix and store its KV cache in `output`."""
    _check_settings(codec, ratio, bits, chunk_size)
    check_output(Path(output))
    started = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    with progress_bars(progress) as task:
        pre = prefill_document(text, lm, chunk_size, task)
        result = write_kvc(pre, output, codec=codec, bits=bits, task=task)
    return replace(result, seconds=time.perf_counter() - started)


def compress(document: str | os.PathLike, output: str | os.PathLike, **options) -> CompressResult:
    """Like `kvc compress DOC -o OUTPUT`: `document` is a UTF-8 text file, or "-" for stdin."""
    return compress_text(read_document(os.fspath(document)), output, **options)
