"""Random baseline: what any scorer must beat. Seeded, so a file can be made again bit for bit."""

from dataclasses import dataclass

import torch

from .base import ScoringInputs


@dataclass
class RandomScorer:
    seed: int = 0
    name: str = "random"
    default_allocation: str = "head"

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        layers, heads = len(inputs.cache.layers), inputs.cache.layers[0].keys.shape[1]
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(layers, heads, inputs.tokens, generator=generator)
