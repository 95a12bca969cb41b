"""Answering a question from a loaded cache: the question appended after the document, greedy decoding, the cache
reset to the document afterwards."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from ..errors import KvcError
from .loader import LoadedKV


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    seconds: float
    stopped: str  # "eos": the model ended its answer; "length": cut at max_new_tokens


def _end_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end an answer: the generation config's EOS (one id or several) and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


class _TextCallback(TextStreamer):
    """transformers' streamer of decoded text, handing each finished piece to `on_text` instead of printing it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


@torch.inference_mode()
def ask(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, kv: LoadedKV, question: str,
        max_new_tokens: int, on_text: Callable[[str], None] | None = None) -> Answer:
    """Append `question` after the cached document and decode greedily; the cache is reset afterwards, so the same
    `kv` answers any number of questions. `on_text` receives the answer's text piece by piece as it is decoded (a
    whole word at a time; the first piece may start with spaces the returned text drops)."""
    ids = kv.prompt_ids(tokenizer, question)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and ids.shape[1] + max_new_tokens > limit:
        raise KvcError(f"document + question + answer need {ids.shape[1] + max_new_tokens} positions; "
                       f"the model has {limit}")
    started = time.perf_counter()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=kv.cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=_TextCallback(tokenizer, on_text) if on_text is not None else None,
        )
    finally:
        kv.reset()
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1] :].tolist()
    stopped = "eos" if new and new[-1] in _end_tokens(model, tokenizer) else "length"
    return Answer(tokenizer.decode(new, skip_special_tokens=True).strip(), new, seconds, stopped)
