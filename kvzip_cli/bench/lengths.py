"""Time to first token from a `.kvc` against re-prefilling the text, over document lengths (`kvc bench --lengths`).

For each length N the first N tokens of the document (repeated when it is shorter) are compressed once with a
preset. Then, side by side in the same process:
- prefill: the model runs document + question through a fresh cache, in the same chunks `kvc compress` uses, and
  picks its first answer token;
- kvc: `load` reads the file into a cache, the model runs the question on it and picks its first answer token.
Both clocks stop at the first token's logits; tokenizing the question is outside both.
"""

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from ..compress.pipeline import compress_text
from ..compress.settings import DEFAULT_CHUNK
from ..document import layout_prompt, question_ids
from ..errors import KvcError, UsageError
from ..load.loader import load
from ..models.loading import LoadedModel
from ..progress import TaskFactory, silent_task

QUESTION = "What is this document about, in one sentence?"
QUESTION_ROOM = 64  # positions kept free for the chat template and the question


@dataclass
class LengthRow:
    tokens: int  # the prompt prefix the cache holds (document + chat template)
    file_bytes: int
    compression: float
    compress_seconds: float
    prefill_ttft: float  # seconds: document + question prefilled from scratch, to the first token
    load_seconds: float  # kvc: file → cache ready
    question_seconds: float  # kvc: the question on the loaded cache, to the first token
    kvc_ttft: float
    speedup: float  # prefill_ttft / kvc_ttft
    load_fp16_mb_per_s: float  # fp16 bytes of the kept K/V produced per second of load
    same_first_token: bool
    decoder: str  # how load decoded the symbols: numpy (CPU) or triton (GPU kernels)


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4000' → [1000, 2000, 4000]."""
    out = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        scale = 1000 if item.endswith("k") else 1
        try:
            value = int(float(item.removesuffix("k")) * scale)
        except ValueError:
            raise UsageError(f"--lengths: {item!r} is not a token count like 2000 or 2k") from None
        if value < 16:
            raise UsageError(f"--lengths: {value} tokens is too short to measure")
        out.append(value)
    if not out:
        raise UsageError("--lengths: give at least one length")
    return sorted(set(out))


def context_limit(lm: LoadedModel) -> int | None:
    return getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)


def check_lengths(lm: LoadedModel, lengths: list[int]) -> None:
    limit = context_limit(lm)
    if limit and all(n + QUESTION_ROOM > limit for n in lengths):
        raise KvcError(f"no length fits the model: {lm.name} handles {limit} positions, a question included")


def document_of(text: str, lm: LoadedModel, tokens: int) -> tuple[str, bool]:
    """The first `tokens` tokens of `text` as text, and whether `text` had to be repeated to reach them."""
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise KvcError("the document has no tokens")
    repeated = len(ids) < tokens
    while len(ids) < tokens:
        ids = ids + lm.tokenizer("\n\n", add_special_tokens=False).input_ids + ids
    return lm.tokenizer.decode(ids[:tokens]), repeated


@torch.inference_mode()
def _prefill_first_token(lm: LoadedModel, ids: list[int], chunk_size: int) -> tuple[float, int]:
    started = time.perf_counter()
    cache = DynamicCache(config=lm.model.config)
    tensor = torch.tensor([ids], device=lm.model.device)
    for start in range(0, len(ids), chunk_size):
        logits = lm.model(input_ids=tensor[:, start : start + chunk_size], past_key_values=cache, use_cache=True,
                          logits_to_keep=1).logits
    token = int(logits[0, -1].argmax())
    return time.perf_counter() - started, token


@torch.inference_mode()
def _kvc_first_token(lm: LoadedModel, path: Path) -> tuple[float, float, int, int, str]:
    """(load seconds, question seconds, first token, fp16 bytes of the loaded K/V, decoder)."""
    kv = load(path, lm)
    started = time.perf_counter()
    ids = kv.prompt_ids(lm.tokenizer, QUESTION)
    question = ids[:, kv.input_ids.shape[1] :]
    logits = lm.model(input_ids=question, past_key_values=kv.cache, use_cache=True, logits_to_keep=1).logits
    token = int(logits[0, -1].argmax())
    seconds = time.perf_counter() - started
    fp16_bytes = kv.cache_bytes() // lm.model.dtype.itemsize * 2
    return kv.load_seconds, seconds, token, fp16_bytes, kv.decoder


def run_lengths(text: str, lm: LoadedModel, lengths: list[int], preset: str, repeats: int = 3,
                task: TaskFactory = silent_task) -> tuple[list[LengthRow], list[str]]:
    """One row per length, and notes (lengths skipped or documents repeated)."""
    limit = context_limit(lm)
    rows, notes = [], []
    _prefill_first_token(lm, lm.tokenizer("warm up", add_special_tokens=False).input_ids, DEFAULT_CHUNK)
    advance = task("lengths", len(lengths), steps=[f"{n:,} tokens" for n in lengths])
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            if limit and n + QUESTION_ROOM > limit:
                notes.append(f"{n} tokens skipped: {lm.name} handles {limit} positions")
                advance(1)
                continue
            document, repeated = document_of(text, lm, n)
            if repeated:
                notes.append(f"{n} tokens: the document was repeated to reach this length")
            path = Path(tmp) / f"{n}.kvc"
            made = compress_text(document, path, model=lm, preset=preset)
            layout = layout_prompt(lm.tokenizer, document)
            full = layout.prefix_ids + question_ids(lm.tokenizer, layout.question_prefix, layout.question_suffix,
                                                    QUESTION)
            prefill_seconds, prefill_token = _prefill_first_token(lm, full, DEFAULT_CHUNK)
            runs = [_kvc_first_token(lm, path) for _ in range(repeats)]
            load_seconds = statistics.median(r[0] for r in runs)
            question_seconds = statistics.median(r[1] for r in runs)
            kvc_ttft = statistics.median(r[0] + r[1] for r in runs)
            rows.append(LengthRow(
                tokens=made.tokens, file_bytes=made.file_bytes, compression=made.compression,
                compress_seconds=made.seconds, prefill_ttft=prefill_seconds, load_seconds=load_seconds,
                question_seconds=question_seconds, kvc_ttft=kvc_ttft, speedup=prefill_seconds / kvc_ttft,
                load_fp16_mb_per_s=runs[0][3] / load_seconds / 1e6, same_first_token=runs[0][2] == prefill_token,
                decoder=runs[0][4],
            ))
            advance(1)
    return rows, notes


def as_json(rows: list[LengthRow], notes: list[str], lm: LoadedModel, preset: str, document: str) -> dict:
    return {"document": document, "model": lm.name, "device": str(lm.model.device), "preset": preset,
            "question": QUESTION, "rows": [asdict(r) for r in rows], "notes": notes}
