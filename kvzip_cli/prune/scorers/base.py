"""What every scorer receives and returns."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kvc_format import CacheGeometry

from ...context import context_geometry, context_positions
from ...document import PromptLayout
from ...progress import TaskFactory, silent_task


@dataclass
class ScoringInputs:
    """A prefilled context (kvzip_cli.prefill): `cache` layer i holds keys/values (1, kv_heads, n, head_dim),
    post-RoPE, the context's last n positions (n = tokens, or a sliding-window layer's window)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cache: DynamicCache
    layout: PromptLayout
    task: TaskFactory = silent_task
    queries: Callable | None = None  # an attention observer recording reference queries (kvzip_cli.prune.refit), if any

    @property
    def tokens(self) -> int:
        return len(self.layout.prefix_ids)

    @property
    def geometry(self) -> CacheGeometry:
        """The context's geometry as the model's own cache holds it (its sliding windows included)."""
        return context_geometry(self.model, self.tokens)

    def stacked(self, which: str) -> torch.Tensor:
        """(layers, kv_heads, tokens, head_dim) keys or values, float32 (zeros where a sliding-window layer holds
        nothing; score_context rates those entries −inf)."""
        return torch.stack([context_positions(getattr(layer, which)[0], self.tokens).float()
                            for layer in self.cache.layers])


class Scorer(Protocol):
    name: str
    default_allocation: str  # "global", "layer" or "head" (see kvzip_cli.prune.budget)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """Importance of every context entry, (layers, kv_heads, tokens), higher = keep; float32 on the CPU."""
        ...
