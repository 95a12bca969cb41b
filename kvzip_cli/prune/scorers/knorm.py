"""Key-norm baseline: entries whose keys have a small L2 norm tend to draw attention (Devoto et al., 2024)."""

from dataclasses import dataclass

import torch

from .base import ScoringInputs


@dataclass
class KnormScorer:
    name: str = "knorm"
    default_allocation: str = "head"

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        return -inputs.stacked("keys").norm(dim=-1).cpu()
