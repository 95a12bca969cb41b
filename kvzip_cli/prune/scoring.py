"""Score a prefilled context and choose the entries to keep."""

import math
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..document import PromptLayout
from ..models.loading import LoadedModel
from ..progress import TaskFactory, silent_task
from . import default_logit_bias
from .budget import allocate, protected_positions, visible_positions
from .refit import ReferenceQueries
from .scorers import ScoringInputs, get_scorer
from .scorers.kvzip import KVzipScorer


@dataclass(frozen=True)
class Scored:
    """One scorer's verdict on a context; `keep` can then be taken at any ratio."""

    scorer: str
    allocation: str  # the scorer's default
    scores: torch.Tensor  # (layers, kv_heads, tokens); entries a layer does not hold (`visible`) score −inf
    protected: torch.Tensor  # (tokens,) bool
    seconds: float
    queries: ReferenceQueries | None = None  # for refitting the kept values (kvzip_cli.prune.refit)
    visible: torch.Tensor | None = None  # (layers, tokens) bool: what each layer's own cache holds; None: all

    def keep(self, ratio: float, allocation: str | None = None) -> "Pruning":
        allocation = allocation or self.allocation
        mask = allocate(self.scores, ratio, allocation, self.protected, self.visible)
        held = None if self.visible is None else int(self.visible.sum()) * mask.shape[1]
        return Pruning(mask, self.scorer, allocation, ratio, self.seconds, self.queries, default_logit_bias(allocation),
                       held)



@dataclass(frozen=True)
class Pruning:
    keep: torch.Tensor  # (layers, kv_heads, tokens) bool
    scorer: str
    allocation: str
    ratio: float  # requested
    score_seconds: float
    queries: ReferenceQueries | None = None  # set: the kept values are refit to these queries when written
    logit_bias: bool = True  # with queries: the kept keys also get a fitted logit bias, stored in the file
    held: int | None = None  # the entries the model's own (windowed) cache holds; None: every entry of `keep`

    @property
    def kept_ratio(self) -> float:
        """Kept entries over those the model's own cache holds."""
        return self.keep.sum().item() / (self.keep.numel() if self.held is None else self.held)


def score_context(lm: LoadedModel, cache: DynamicCache, layout: PromptLayout, scorer: str,
                  task: TaskFactory = silent_task, refit: bool = True) -> Scored:
    """Run `scorer` over a prefilled context. The cache is left as it was. With `refit`, the KVzip reconstruction
    queries are recorded too (while scoring for KVzip, in their own passes for the other scorers), so the kept
    values can be refit to them (kvzip_cli.prune.refit); `seconds` counts both. Entries outside a sliding-window layer's
    window score −inf: the model's own cache does not hold them."""
    chosen = get_scorer(scorer)
    started = time.perf_counter()
    inputs = ScoringInputs(lm.model, lm.tokenizer, cache, layout, task)
    visible = visible_positions(inputs.geometry)
    passes = KVzipScorer()
    if refit:
        inputs.queries = ReferenceQueries.for_positions(passes.reconstruction_positions(inputs))
    scores = chosen.score(inputs).masked_fill(~visible[:, None, :], -math.inf)
    if refit and not getattr(chosen, "records_queries", False):
        passes.reconstruct(inputs, lambda *_: None, "reference queries")
    return Scored(chosen.name, chosen.default_allocation, scores, protected_positions(layout),
                  time.perf_counter() - started, inputs.queries, visible)
