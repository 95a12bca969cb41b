"""Refit the kept values after pruning, so the pruned context answers the reference queries as the full one does.

Dropping entries changes what attention over the context returns: for a query q, the full context gives
o = softmax(q·K/√d) V over all T entries, the pruned one softmax(q·K_S/√d) V_S over the kept set S. Keeping K_S (the
logits, hence which entries a query reads), the kept values can be chosen so that the second matches the first on
the queries the context will meet: with A_S the pruned attention weights of n reference queries (n, |S|) and O their
full-context outputs (n, head_dim), V_S' = argmin ‖A_S V' − O‖² + λ‖V' − V_S‖², in closed form
(A_Sᵀ A_S + λ I) V' = A_Sᵀ O + λ V_S (the ridge term keeps V' near the original values where the queries do not pin
them down). This is the value half of Attention Matching (arXiv 2602.16284); the file format is unchanged, since
only the stored values differ.

The reference queries are KVzip's reconstruction queries (the model repeating the document after it, so they see the
whole context as a question will), recorded per layer and query head, every `stride`-th position. The fit is per
(layer, KV head) with the query heads of its GQA group stacked. Layers with a sliding window shorter than the
context are left as they are: a later query sees only the window, not the whole context the fit assumes.
"""

import math

import torch

MAX_QUERIES = 2048  # reference queries kept per layer and query head: bounds memory (and time) on long documents
RIDGE = 0.001  # λ as a fraction of the mean diagonal of A_Sᵀ A_S; lowest kld of 0.1, 0.01, 0.001 at kept 0.3


class ReferenceQueries:
    """An attention observer (kvzip_cli.attention.observe_attention) that keeps every `stride`-th query of each
    layer, with the layer's scaling; it leaves the attention itself to SDPA."""

    def __init__(self, stride: int = 1) -> None:
        self.stride = max(1, stride)
        self._seen: dict[int, int] = {}
        self._queries: dict[int, list[torch.Tensor]] = {}
        self.scaling: dict[int, float] = {}

    @classmethod
    def for_positions(cls, positions: int) -> "ReferenceQueries":
        """An observer that keeps at most MAX_QUERIES of `positions` queries per layer."""
        return cls(math.ceil(positions / MAX_QUERIES))

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scaling: float) -> None:
        """query (1, heads, q, head_dim)."""
        seen = self._seen.get(layer, 0)
        first = (-seen) % self.stride  # the next multiple of the stride, counted over every call of this layer
        self._queries.setdefault(layer, []).append(query[0, :, first :: self.stride].float().cpu())
        self._seen[layer] = seen + query.shape[2]
        self.scaling[layer] = scaling

    def layer(self, index: int) -> torch.Tensor | None:
        """(heads, n, head_dim) float32, or None if the layer was never observed."""
        parts = self._queries.get(index)
        return torch.cat(parts, dim=1) if parts else None


def _logits(query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    logits = query @ keys.transpose(-1, -2) * scaling
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def refit_values(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, queries: torch.Tensor,
                 scaling: float, softcap: float | None = None, ridge: float = RIDGE) -> torch.Tensor:
    """keys/values (kv_heads, tokens, head_dim) post-RoPE, keep (kv_heads, tokens) bool, queries (heads, n, head_dim)
    → values (kv_heads, tokens, head_dim) float32, the kept rows refit (module docstring), the others unchanged."""
    kv_heads, _, dim = keys.shape
    group = queries.shape[0] // kv_heads
    keys, values = keys.float(), values.float()
    out = values.clone()
    for h in range(kv_heads):
        kept = keep[h].nonzero().squeeze(-1)
        if not len(kept):
            continue
        q = queries[h * group : (h + 1) * group].reshape(-1, dim).to(keys.device)
        logits = _logits(q, keys[h], scaling, softcap)
        target = torch.softmax(logits, dim=-1) @ values[h]
        weights = torch.softmax(_logits(q, keys[h, kept], scaling, softcap), dim=-1)
        gram = (weights.T @ weights).double()
        lam = ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
        rhs = (weights.T @ target).double() + lam * values[h, kept].double()
        gram.diagonal().add_(lam)
        solved = torch.linalg.solve(gram, rhs).float()
        if torch.isfinite(solved).all():
            out[h, kept] = solved
    return out


def output_error(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, queries: torch.Tensor,
                 scaling: float, refit: torch.Tensor | None = None, softcap: float | None = None) -> float:
    """Σ ‖A_S V' − O‖² over the KV heads: what `refit_values` minimises (without its ridge term), for `refit` values
    V' (default: the original ones)."""
    kv_heads, _, dim = keys.shape
    group = queries.shape[0] // kv_heads
    stored = values if refit is None else refit
    total = 0.0
    for h in range(kv_heads):
        q = queries[h * group : (h + 1) * group].reshape(-1, dim)
        logits = _logits(q, keys[h].float(), scaling, softcap)
        target = torch.softmax(logits, dim=-1) @ values[h].float()
        read = _logits(q, keys[h, keep[h]].float(), scaling, softcap)
        pruned = torch.softmax(read, dim=-1) @ stored[h, keep[h]].float()
        total += float((pruned - target).double().pow(2).sum())
    return total
