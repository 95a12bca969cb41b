"""Turn scores into kept entries: `ratio` of all (layer, KV head, position) entries, allocated four ways.

- global: one threshold over every layer and head (KVzip's default), so layers and heads get unequal shares, but
  for the layers whose sliding window is shorter than the context, which share their own part of the budget
  (`_global`);
- layer: the same share for every layer, a threshold per layer over its heads;
- head: the same share for every (layer, head);
- position: one set of positions, chosen from scores pooled over layers and heads, kept in every layer and head
  (the only pruned layout a runtime with one cache cell per position, such as llama.cpp, can hold).
The chat template around the document and the first `SINK_TOKENS` positions (attention sinks) are kept in every
head, whatever they score; they are each head's floor, so no head is ever emptied. The number kept is exact:
round(ratio × entries), and for position round(ratio × tokens) positions in each of the layers × kv_heads rows.

Entries are those the model's own cache holds: a sliding-window layer (window W) holds only the document's last
W − 1 positions (`visible_positions`), the only ones a later token can attend. The others are never kept, spend no
budget and are not counted; the floor is the template and sinks that a layer holds; layer and head shares are in
proportion to the positions each holds; a position allocation keeps its positions where a layer holds them, so its
count per row is round(ratio × tokens) only for layers without a window.
"""

import math

import torch

from kvc_format import CacheGeometry

from ..document import PromptLayout
from ..errors import KvcError, UsageError
from . import ALLOCATIONS, check_allocation  # noqa: F401 (ALLOCATIONS: re-exported)

SINK_TOKENS = 4
# Global allocation where some layers' windows are shorter than the context (Gemma 3 270M, kvzip scores, values and
# bias refit; studies/gemma3/results/window-allocation.md): the windows are kept whole when that takes at most half the
# budget (23k tokens at 25% kept: kld 0.153, against 0.193 / 0.227 with 30% / 10% of each window and 0.358 with one
# threshold); else they share a tenth of it (2.4k tokens at 30% kept: kld 0.043 with 5% of each window, against 0.059
# / 0.089 / 0.153 with 10% / 20% / 30% and 0.072 with one threshold).
WINDOWS_WHOLE = 0.5
WINDOWS_SHARE = 0.1


def protected_positions(layout: PromptLayout) -> torch.Tensor:
    """(tokens,) bool: the template tokens outside the document span, and the attention sinks."""
    protected = torch.ones(len(layout.prefix_ids), dtype=torch.bool)
    protected[layout.document_start : layout.document_end] = False
    protected[:SINK_TOKENS] = True
    return protected


def visible_positions(geometry: CacheGeometry) -> torch.Tensor:
    """(layers, tokens) bool: the positions each layer's own cache holds (all of them, but for a sliding-window
    layer the last window − 1)."""
    visible = torch.zeros(geometry.layers, geometry.tokens, dtype=torch.bool)
    for layer in range(geometry.layers):
        visible[layer, geometry.first_position(layer) :] = True
    return visible


def _apportion(total: int, sizes: torch.Tensor) -> torch.Tensor:
    """`total` split over groups in proportion to `sizes` (groups, long), as integers summing to it exactly: the
    floors, then one more to the largest remainders (the first groups among equals; equal sizes share near-equally)."""
    exact = total * sizes.double() / sizes.sum()
    share = exact.floor().long()
    left = total - int(share.sum())
    if left:
        order = (exact - share).argsort(descending=True, stable=True)
        share[order[:left]] += 1
    return share


def top_per_group(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """scores (groups, n), counts (groups,) → bool (groups, n) marking each group's `count` highest."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(scores.shape[-1])[None, :] < counts[:, None]
    return keep.scatter_(-1, order, ranks)


def check_ratio(ratio: float, protected: torch.Tensor, entries_per_token: int = 1,
                visible: torch.Tensor | None = None) -> int:
    """The number of entries `ratio` keeps of the `entries_per_token` × visible tokens (every token of every layer
    without `visible`, (layers, tokens)); refuses a ratio below the floor, the protected positions held."""
    if not 0 < ratio <= 1:
        raise UsageError(f"ratio {ratio} is out of range: it is the kept fraction, 0 < ratio <= 1")
    visible = torch.ones(1, len(protected), dtype=torch.bool) if visible is None else visible
    entries = entries_per_token * int(visible.sum())
    budget = round(ratio * entries)
    floor = int((visible & protected).sum()) * entries_per_token
    if budget < floor:
        least = math.ceil(1000 * floor / entries) / 1000
        raise KvcError(
            f"ratio {ratio} keeps fewer entries than the chat template and attention sinks that every head keeps "
            f"({floor / entries:.1%} of this document's cache): use a ratio of at least {least}"
        )
    return budget



def _pool(scores: torch.Tensor, protected: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """scores (layers, kv_heads, tokens), protected (tokens,), visible (layers, tokens) → (tokens,) float64: for
    each document position, the mean over the (layer, head) entries holding it of their ranks among all the
    document's held entries (0 at protected positions, −inf at a position no layer holds)."""
    # Global ranks: scale-free for any scorer, lowest kld of 8 poolings tried (that comparison was not kept; the
    # shipped pooling's figures are in studies/bench-corpus/results/position/).
    held = (visible & ~protected)[:, None, :].expand(scores.shape)
    ranks = torch.full(scores.shape, math.nan, dtype=torch.float64)
    document = scores[held]
    order = torch.empty(document.numel(), dtype=torch.float64)
    order[document.argsort(stable=True)] = torch.arange(document.numel(), dtype=torch.float64)
    ranks[held] = order
    pooled = ranks.nanmean(dim=(0, 1))
    pooled[protected] = 0.0
    return pooled.nan_to_num(nan=-math.inf)


def _global(scores: torch.Tensor, budget: int, visible: torch.Tensor, floors: torch.Tensor) -> torch.Tensor:
    """One threshold over every entry, but for the layers whose window is shorter than the context: they first take
    their whole windows or WINDOWS_SHARE of the budget (WINDOWS_WHOLE), in shares proportional to what each holds
    (the scores of the two kinds of layer are not comparable: KVzip's reconstruction queries rarely see a window's
    entries, so one threshold leaves the windows a few percent of their entries, unevenly).
    floors (layers,): the entries each layer keeps whatever it scores."""
    layers, heads, tokens = scores.shape
    sliding = visible.sum(-1) < tokens
    if not sliding.any() or sliding.all():
        return top_per_group(scores.view(1, -1), torch.tensor([budget])).view(layers, heads, tokens)
    windows = heads * int(visible[sliding].sum())
    take = windows if windows <= WINDOWS_WHOLE * budget else round(WINDOWS_SHARE * budget)
    take = max(min(take, budget - int(floors[~sliding].sum())), int(floors[sliding].sum()))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    counts = torch.maximum(_apportion(take, visible[sliding].sum(-1)), floors[sliding])
    keep[sliding] = top_per_group(scores[sliding].reshape(int(sliding.sum()), -1), counts).view(-1, heads, tokens)
    rest = scores[~sliding]
    keep[~sliding] = top_per_group(rest.reshape(1, -1), torch.tensor([budget - int(counts.sum())])).view(rest.shape)
    return keep


def allocate(scores: torch.Tensor, ratio: float, allocation: str, protected: torch.Tensor,
             visible: torch.Tensor | None = None) -> torch.Tensor:
    """scores (layers, kv_heads, tokens), protected (tokens,), visible (layers, tokens) or None (every position of
    every layer) → keep mask (layers, kv_heads, tokens), bool."""
    check_allocation(allocation)
    layers, heads, tokens = scores.shape
    visible = torch.ones(layers, tokens, dtype=torch.bool) if visible is None else visible
    held = visible[:, None, :].expand(layers, heads, tokens)
    # scores that are not numbers rank below every number, entries a layer does not hold below those
    s = torch.nan_to_num(scores.float(), nan=torch.finfo(torch.float32).min).clone()
    if allocation == "position":
        budget = check_ratio(ratio, protected)  # in positions
        pooled = _pool(s, protected, visible)
        pooled[protected] = math.inf
        keep = top_per_group(pooled[None], torch.tensor([budget])).expand(layers, heads, tokens)
        return keep & held
    budget = check_ratio(ratio, protected, heads, visible)
    s[..., protected] = math.inf
    s[~held] = -math.inf
    floors = (visible & protected).sum(-1)  # (layers,): what each of a layer's heads keeps whatever it scores
    if allocation == "global":
        return _global(s, budget, visible, floors * heads)
    if allocation == "layer":
        counts = torch.maximum(_apportion(budget, visible.sum(-1)), floors * heads)
        return top_per_group(s.view(layers, -1), counts).view(layers, heads, tokens)
    sizes = visible.sum(-1).repeat_interleave(heads)
    counts = torch.maximum(_apportion(budget, sizes), floors.repeat_interleave(heads))
    return top_per_group(s.view(layers * heads, -1), counts).view(layers, heads, tokens)
