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
whole context as a question will), recorded per layer and query head, every `stride`-th position, with their
positions. The fit is per (layer, KV head) with the query heads of its GQA group stacked. In a sliding-window layer
(window W) a query at position p sees only the entries at positions > p − W, so each query's full and pruned
attention are taken over what it sees, and a query that sees no kept entry does not enter the fit: of a long
document, the queries right after it, as a question's.

The logit bias (`logit_bias=True`), the other half of Attention Matching: pruning also removes attention mass, so a
query's weights renormalise over the kept keys and the context as a whole weighs less, against the question's own
tokens, than the full context did. Each kept key j gets a bias β_j = log w_j added to its logit, with w ≥ 0 fit so that
the kept keys carry each reference query's full-context mass: min ‖S w − 1‖² where S_ij = exp(ℓ_ij) / Σ_all exp(ℓ_i·)
(query i's share on kept key j, over the full context), by Lee–Seung multiplicative updates with w held within
[1/BIAS_RANGE, BIAS_RANGE]; β is rounded to a grid of BIAS_STEP, and the values are then refit with the biased
weights. The file stores β per kept entry (section kv_layer_bias, SPEC.md) and kvc's attention adds it
(kvzip_cli.load.pruned_cache.PrunedLayer).
"""

import math
from typing import NamedTuple

import torch

MAX_QUERIES = 2048  # reference queries kept per layer and query head: bounds memory (and time) on long documents
REFIT_ROWS = 1024  # reference queries whose logits over the whole context are held at once
RIDGE = 0.001  # λ as a fraction of the mean diagonal of A_Sᵀ A_S; lowest kld of 0.1, 0.01, 0.001 at kept 0.3
BIAS_ITERATIONS = 100  # multiplicative updates of the bias fit (studies/logit-bias/logit_bias_study.py)
BIAS_RANGE = 100.0  # w within [1/BIAS_RANGE, BIAS_RANGE]: |β| ≤ ln 100 ≈ 4.6
# β is rounded to this grid before the values are fit to it: exact in float16, and about 6 bits per stored value once
# zstd-coded instead of 14 (0.05 instead of 0.12 bits per kept element on apache-2.0 at balanced), for logit errors
# of at most 1/64.
BIAS_STEP = 1 / 32


class ReferenceQueries:
    """An attention observer (kvzip_cli.attention.observe_attention) that keeps every `stride`-th query of each
    layer, with the layer's scaling; it leaves the attention itself to SDPA."""

    def __init__(self, stride: int = 1) -> None:
        self.stride = max(1, stride)
        self._seen: dict[int, int] = {}
        self._queries: dict[int, list[torch.Tensor]] = {}
        self._positions: dict[int, list[torch.Tensor]] = {}
        self.scaling: dict[int, float] = {}
        self.at = 0  # the position of the running forward's first query (set by whoever runs the passes)

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
        self._positions.setdefault(layer, []).append(torch.arange(query.shape[2])[first :: self.stride] + self.at)
        self._seen[layer] = seen + query.shape[2]
        self.scaling[layer] = scaling

    def layer(self, index: int) -> torch.Tensor | None:
        """(heads, n, head_dim) float32, or None if the layer was never observed."""
        parts = self._queries.get(index)
        return torch.cat(parts, dim=1) if parts else None

    def positions(self, index: int) -> torch.Tensor | None:
        """(n,) int64: the position of each of the layer's queries, or None if the layer was never observed."""
        parts = self._positions.get(index)
        return torch.cat(parts) if parts else None


def _logits(query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    logits = query @ keys.transpose(-1, -2) * scaling
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


class Refit(NamedTuple):
    values: torch.Tensor  # (kv_heads, tokens, head_dim) float32: the kept rows refit, the others unchanged
    bias: list[torch.Tensor] | None  # per KV head (kept_h,) float32, the kept keys' logit bias; None without one


def _seen(window: tuple[torch.Tensor, int] | None, tokens: int, group: int, device) -> torch.Tensor | None:
    """(group × n, tokens) bool: the entries each of a KV head's stacked queries sees in a sliding-window layer
    (`window` = (the queries' positions (n,), W)); None without a window: every query sees every entry."""
    if window is None:
        return None
    at, width = window
    return (torch.arange(tokens, device=device)[None, :] > at.to(device)[:, None] - width).repeat(group, 1)


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, scaling: float,
               softcap: float | None, seen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (m, head_dim), keys/values (tokens, head_dim) → (share (m', kept) float64: each query's full-context
    attention weight on each kept entry; output (m', head_dim): its full-context attention output), over the m'
    queries that see a kept entry (all without `seen`) and put some weight on one, REFIT_ROWS queries at a time: no
    (m, tokens) matrix is held at once (8,192 × 24k float32 would be 0.8 GB per head on a long document)."""
    shares, outputs = [], []
    for a in range(0, len(q), REFIT_ROWS):
        logits = _logits(q[a : a + REFIT_ROWS], keys, scaling, softcap)
        if seen is not None:
            block = seen[a : a + REFIT_ROWS]
            fit = block[:, kept].any(dim=1)
            logits = logits[fit].masked_fill(~block[fit], -math.inf)
        weights = torch.softmax(logits.double(), dim=-1)  # float64: a kept entry's share never underflows to 0
        share = weights[:, kept]
        carried = share.sum(dim=1) > 0  # a query with no mass on any kept entry cannot be fit
        shares.append(share[carried])
        outputs.append((weights[carried] @ values.double()).float())
    if not shares:
        return q.new_zeros(0, len(kept), dtype=torch.float64), q.new_zeros(0, values.shape[-1])
    return torch.cat(shares), torch.cat(outputs)


def _biased(share: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The pruned attention weights (m, kept) float32 with the logit bias: softmax over the kept entries of
    logit + bias, which is each row of share × exp(bias) normalised."""
    weights = share * bias.double().exp()
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def refit_values(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, queries: torch.Tensor,
                 scaling: float, softcap: float | None = None, ridge: float = RIDGE, logit_bias: bool = False,
                 window: tuple[torch.Tensor, int] | None = None) -> Refit:
    """keys/values (kv_heads, tokens, head_dim) post-RoPE, keep (kv_heads, tokens) bool, queries (heads, n, head_dim)
    → the refit values and, with `logit_bias`, the kept keys' bias (module docstring). `window` = (the queries'
    positions (n,), W) for a sliding-window layer: each query sees the entries at positions > its own − W."""
    kv_heads, tokens, dim = keys.shape
    group = queries.shape[0] // kv_heads
    keys, values = keys.float(), values.float()
    seen = _seen(window, tokens, group, keys.device)
    out = values.clone()
    biases = []
    for h in range(kv_heads):
        kept = keep[h].nonzero().squeeze(-1)
        bias = torch.zeros(len(kept), device=keys.device)
        q = queries[h * group : (h + 1) * group].reshape(-1, dim).to(keys.device)
        share, target = _attention(q, keys[h], values[h], kept, scaling, softcap, seen)
        if len(kept) and len(share):
            if logit_bias:
                bias = torch.round(_fit_bias(share).float() / BIAS_STEP) * BIAS_STEP
            solved = _solve(_biased(share, bias), target, values[h, kept], ridge)
            if torch.isfinite(solved).all() and torch.isfinite(bias).all():
                out[h, kept] = solved
            else:
                bias.zero_()
        biases.append(bias)
    return Refit(out, biases if logit_bias else None)


def _fit_bias(share: torch.Tensor) -> torch.Tensor:
    """share (n, kept): each query's full-context weight on each kept key → β (kept,) = log w, w ≥ 0 minimising
    ‖share · w − 1‖² within [1/BIAS_RANGE, BIAS_RANGE] (Lee–Seung multiplicative updates from w = 1)."""
    gram, wanted = share.T @ share, share.sum(0)
    w = torch.ones_like(wanted)
    for _ in range(BIAS_ITERATIONS):
        w = (w * wanted / (gram @ w).clamp_min(1e-30)).clamp(1 / BIAS_RANGE, BIAS_RANGE)
    return w.log()


def _solve(weights: torch.Tensor, target: torch.Tensor, old: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin ‖weights · V − target‖² + λ‖V − old‖², λ = ridge × the mean diagonal of weightsᵀ weights."""
    gram = (weights.T @ weights).double()
    lam = ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
    rhs = (weights.T @ target).double() + lam * old.double()
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, rhs).float()


def output_error(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, queries: torch.Tensor,
                 scaling: float, refit: Refit | None = None, softcap: float | None = None,
                 window: tuple[torch.Tensor, int] | None = None) -> float:
    """Σ ‖A_S V' − O‖² over the KV heads: what `refit_values` minimises (without its ridge term), for a `refit`'s values
    V' and bias (default: the original values, no bias); `window` as there."""
    kv_heads, tokens, dim = keys.shape
    group = queries.shape[0] // kv_heads
    seen = _seen(window, tokens, group, keys.device)
    stored = values if refit is None else refit.values
    total = 0.0
    for h in range(kv_heads):
        kept = keep[h].nonzero().squeeze(-1)
        q = queries[h * group : (h + 1) * group].reshape(-1, dim)
        share, target = _attention(q, keys[h].float(), values[h].float(), kept, scaling, softcap, seen)
        bias = refit.bias[h] if refit is not None and refit.bias is not None else torch.zeros(len(kept))
        pruned = _biased(share, bias) @ stored[h, kept].float()
        total += float((pruned - target).double().pow(2).sum())
    return total
