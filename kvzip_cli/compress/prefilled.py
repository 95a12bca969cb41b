"""A document laid out in the chat template and prefilled once (`prefill_document`): what every setting of a
compression, and its calibrated search, starts from."""

import time
from dataclasses import dataclass

import numpy as np
from transformers import DynamicCache

from kvc_format import CacheGeometry

from ..attention import kvc_attention_in, observe_attention
from ..context import context_geometry
from ..document import PromptLayout, layout_prompt
from ..errors import KvcError
from ..models.families import check_supported
from ..models.fingerprint import fingerprint
from ..models.loading import LoadedModel
from ..prefill import prefill
from ..progress import TaskFactory, silent_task
from .key_units import QueryEnergy
from .settings import DEFAULT_CHUNK

# Positions a document leaves free in the model's context: a question and a short answer, and KVzip's
# reconstruction passes (which run after the document, in chunks no shorter than PROMPT_ROOM).
ANSWER_ROOM = 128


@dataclass
class Prefilled:
    """A document's KV cache as the model holds it (kvzip_cli.prefill: a sliding-window layer its window), computed
    once; `write_kvc` can store it under any number of settings."""

    lm: LoadedModel
    text: str
    layout: PromptLayout
    cache: DynamicCache
    identity: dict
    prefill_seconds: float
    chunk_size: int
    query_energy: np.ndarray | None = None  # (layers, heads, head_dim) mean q² over the prefill (key_units)
    source: str | None = None  # the document's name as given (a path, "-" for stdin), recorded in the header

    @property
    def tokens(self) -> int:
        return len(self.layout.prefix_ids)

    @property
    def geometry(self) -> CacheGeometry:
        """The context as the model's own cache holds it: what a file stores at most (sliding windows included)."""
        return context_geometry(self.lm.model, self.tokens)


def prefill_document(text: str, lm: LoadedModel, chunk_size: int = DEFAULT_CHUNK,
                     task: TaskFactory = silent_task, source: str | None = None) -> Prefilled:
    """Lay `text` out as a prompt prefix and prefill it in chunks (KvcError for an architecture kvc cannot cache)."""
    check_supported(lm.model)
    layout = layout_prompt(lm.tokenizer, text)
    tokens = len(layout.prefix_ids)
    limit = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    if limit and tokens + ANSWER_ROOM > limit:
        raise KvcError(f"the document is {tokens} tokens; model {lm.name!r} handles at most {limit} positions, "
                       f"{ANSWER_ROOM} of them kept for a question and its answer: shorten the document")
    identity = fingerprint(lm.model, lm.tokenizer)
    started = time.perf_counter()
    energy = QueryEnergy()
    with kvc_attention_in(lm.model), observe_attention(energy):
        cache = prefill(lm.model, layout.prefix_ids, chunk_size, task("prefill", tokens))
    return Prefilled(lm, text, layout, cache, identity, time.perf_counter() - started, chunk_size, energy.mean(),
                     source)
