"""Turn scores into kept entries: `ratio` of all (layer, KV head, position) entries, allocated four ways.

- global: one threshold over every layer and head (KVzip's default), so layers and heads get unequal shares;
- layer: the same share for every layer, a threshold per layer over its heads;
- head: the same share for every (layer, head);
- position: one set of positions, chosen from scores pooled over layers and heads, kept in every layer and head
  (the only pruned layout a runtime with one cache cell per position, such as llama.cpp, can hold).
The chat template around the document and the first `SINK_TOKENS` positions (attention sinks) are kept in every
head, whatever they score; they are each head's floor, so no head is ever emptied. The number kept is exact:
round(ratio × entries), and for position round(ratio × tokens) positions in each of the layers × kv_heads rows.
"""

import math

import torch

from .document import PromptLayout
from .errors import KvcError, UsageError

ALLOCATIONS = ("global", "layer", "head", "position")
SINK_TOKENS = 4


def protected_positions(layout: PromptLayout) -> torch.Tensor:
    """(tokens,) bool: the template tokens outside the document span, and the attention sinks."""
    protected = torch.ones(len(layout.prefix_ids), dtype=torch.bool)
    protected[layout.document_start : layout.document_end] = False
    protected[:SINK_TOKENS] = True
    return protected


def _split(total: int, parts: int) -> torch.Tensor:
    """`total` as `parts` near-equal integers summing to it exactly."""
    share = torch.full((parts,), total // parts, dtype=torch.long)
    share[: total % parts] += 1
    return share


def _top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """scores (groups, n), counts (groups,) → bool (groups, n) marking each group's `count` highest."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(scores.shape[-1])[None, :] < counts[:, None]
    return keep.scatter_(-1, order, ranks)


def check_ratio(ratio: float, protected: torch.Tensor, entries_per_token: int = 1) -> int:
    """The number of entries `ratio` keeps of `entries_per_token` × tokens; refuses a ratio below the floor."""
    if not 0 < ratio <= 1:
        raise UsageError(f"ratio {ratio} is out of range: it is the kept fraction, 0 < ratio <= 1")
    entries = entries_per_token * len(protected)
    budget = round(ratio * entries)
    floor = int(protected.sum()) * entries_per_token
    if budget < floor:
        least = math.ceil(1000 * floor / entries) / 1000
        raise KvcError(
            f"ratio {ratio} keeps fewer entries than the chat template and attention sinks that every head keeps "
            f"({floor / entries:.1%} of this document's cache): use a ratio of at least {least}"
        )
    return budget


def check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation {allocation!r}: use one of {', '.join(ALLOCATIONS)}")


def _pool(scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """scores (layers, kv_heads, tokens), protected (tokens,) → (tokens,) float64: for each document position, the
    mean over (layer, head) of its entries' ranks among all the document's entries (0 at protected positions)."""
    # Global ranks: scale-free for any scorer, lowest kld of 8 poolings (examples/results/position-allocation.md).
    document = scores[..., ~protected]
    ranks = torch.empty(document.numel(), dtype=torch.float64)
    ranks[document.flatten().argsort(stable=True)] = torch.arange(document.numel(), dtype=torch.float64)
    pooled = torch.zeros(scores.shape[-1], dtype=torch.float64)
    pooled[~protected] = ranks.view(document.shape).mean(dim=(0, 1))
    return pooled


def allocate(scores: torch.Tensor, ratio: float, allocation: str, protected: torch.Tensor) -> torch.Tensor:
    """scores (layers, kv_heads, tokens), protected (tokens,) → keep mask (layers, kv_heads, tokens), bool."""
    check_allocation(allocation)
    layers, heads, tokens = scores.shape
    s = torch.nan_to_num(scores.float(), nan=-math.inf).clone()
    if allocation == "position":
        budget = check_ratio(ratio, protected)  # in positions
        pooled = _pool(s, protected)
        pooled[protected] = math.inf
        return _top(pooled[None], torch.tensor([budget])).expand(layers, heads, tokens).clone()
    budget = check_ratio(ratio, protected, layers * heads)
    s[..., protected] = math.inf
    if allocation == "global":
        return _top(s.view(1, -1), torch.tensor([budget])).view(layers, heads, tokens)
    if allocation == "layer":
        return _top(s.view(layers, -1), _split(budget, layers)).view(layers, heads, tokens)
    return _top(s.view(layers * heads, -1), _split(budget, layers * heads)).view(layers, heads, tokens)
