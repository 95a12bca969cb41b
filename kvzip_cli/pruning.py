"""Score a prefilled context and choose the entries to keep."""

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .budget import allocate, protected_positions
from .document import PromptLayout
from .models import LoadedModel
from .progress import TaskFactory, silent_task
from .scorers import ScoringInputs, get_scorer


@dataclass(frozen=True)
class Scored:
    """One scorer's verdict on a context; `keep` can then be taken at any ratio."""

    scorer: str
    allocation: str  # the scorer's default
    scores: torch.Tensor  # (layers, kv_heads, tokens)
    protected: torch.Tensor  # (tokens,) bool
    seconds: float

    def keep(self, ratio: float, allocation: str | None = None) -> "Pruning":
        allocation = allocation or self.allocation
        mask = allocate(self.scores, ratio, allocation, self.protected)
        return Pruning(mask, self.scorer, allocation, ratio, self.seconds)


@dataclass(frozen=True)
class Pruning:
    keep: torch.Tensor  # (layers, kv_heads, tokens) bool
    scorer: str
    allocation: str
    ratio: float  # requested
    score_seconds: float

    @property
    def kept_ratio(self) -> float:
        return self.keep.sum().item() / self.keep.numel()


def score_context(lm: LoadedModel, cache: DynamicCache, layout: PromptLayout, scorer: str,
                  task: TaskFactory = silent_task) -> Scored:
    """Run `scorer` over a prefilled context. The cache is left as it was."""
    chosen = get_scorer(scorer)
    started = time.perf_counter()
    scores = chosen.score(ScoringInputs(lm.model, lm.tokenizer, cache, layout, task))
    return Scored(chosen.name, chosen.default_allocation, scores, protected_positions(layout),
                  time.perf_counter() - started)
