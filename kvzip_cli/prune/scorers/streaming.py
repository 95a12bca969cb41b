"""StreamingLLM baseline: the attention sinks (always kept by the budget) plus the most recent tokens."""

from dataclasses import dataclass

import torch

from .base import ScoringInputs


@dataclass
class StreamingScorer:
    name: str = "streaming"
    default_allocation: str = "head"

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        layers, heads = len(inputs.cache.layers), inputs.cache.layers[0].keys.shape[1]
        recency = torch.arange(inputs.tokens, dtype=torch.float32)
        return recency.expand(layers, heads, -1).clone()
