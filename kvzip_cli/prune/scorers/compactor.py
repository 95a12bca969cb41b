"""Compactor (Chari & Van Durme, 2025): approximate leverage of the keys, blended with non-causal local attention.

- Leverage: per KV head, the pre-RoPE keys are centred over the sequence and sketched with a Gaussian projection;
  an entry's score is its statistical leverage (how far its key sticks out of the subspace the others span).
- Attention: post-RoPE queries attend non-causally within tiles of `tile` tokens; each key's received attention,
  summed over the tile's queries and averaged over its GQA group, is weighted by ‖v‖ and lightly smoothed.
Both parts are z-scored per (layer, head) and added, leverage weighted by `leverage_weight`. The attention part
needs the queries, which a cache does not hold, so the context is run through the model once more.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ...attention import kvc_attention_in, observe_attention
from ...rope import layer_rope_tables, unrotate
from ..budget import visible_positions
from .base import ScoringInputs


def leverage(x: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Ridge leverage of each row: x (..., n, r) → (..., n), the diagonal of X (XᵀX + λI)⁻¹ Xᵀ."""
    gram = x.transpose(-1, -2) @ x
    r = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)[..., None].clamp_min(1e-12)
    eye = torch.eye(r, dtype=x.dtype, device=x.device)
    solved = torch.linalg.solve(gram + ridge * scale * eye, x.transpose(-1, -2))  # (..., r, n)
    return (x * solved.transpose(-1, -2)).sum(-1)


def zscore(x: torch.Tensor, held: torch.Tensor | None = None) -> torch.Tensor:
    """x (layers, kv_heads, tokens) standardised per (layer, head) over the positions each layer holds (`held`,
    (layers, tokens) bool; all without it): a sliding-window layer's statistics are its window's."""
    if held is None:
        return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-6)
    weight = held[:, None, :].to(x.dtype)
    count = weight.sum(-1, keepdim=True)
    mean = (x * weight).sum(-1, keepdim=True) / count
    std = (((x - mean) * weight).pow(2).sum(-1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
    return (x - mean) / std.clamp_min(1e-6)


@dataclass
class CompactorScorer:
    tile: int = 256
    sketch_dim: int = 48
    leverage_weight: float = 0.5
    smoothing: int = 5  # odd width of the moving average over positions
    seed: int = 0
    name: str = "compactor"
    default_allocation: str = "global"

    def leverage_scores(self, inputs: ScoringInputs) -> torch.Tensor:
        keys = inputs.stacked("keys")  # (layers, kv_heads, tokens, head_dim)
        tables = layer_rope_tables(inputs.model, torch.arange(inputs.tokens))
        x = keys if tables is None else torch.stack([unrotate(k, *t) for k, t in zip(keys, tables, strict=True)])
        x = x - x.mean(dim=2, keepdim=True)
        dim = x.shape[-1]
        if self.sketch_dim < dim:
            generator = torch.Generator().manual_seed(self.seed)
            sketch = torch.randn(dim, self.sketch_dim, generator=generator) / self.sketch_dim**0.5
            x = x @ sketch.to(x.device)
        return leverage(x.double()).float()

    @torch.inference_mode()
    def attention_scores(self, inputs: ScoringInputs) -> torch.Tensor:
        model, n = inputs.model, inputs.tokens
        layers, kv_heads = len(inputs.cache.layers), inputs.cache.layers[0].keys.shape[1]
        received = torch.zeros(layers, kv_heads, n, device=model.device)

        def observer(layer: int, query, key, value, scaling):
            _, heads, c, dim = query.shape
            first = key.shape[2] - c
            for a in range(0, c, self.tile):
                b = min(a + self.tile, c)
                q = query[0, :, a:b].reshape(kv_heads, heads // kv_heads, b - a, dim)
                k = key[0, :, first + a : first + b].unsqueeze(1)
                weights = torch.softmax((q @ k.transpose(-1, -2)).float() * scaling, dim=-1)
                summed = weights.sum(dim=2).mean(dim=1)  # (kv_heads, tile): received, averaged over the group
                norms = value[0, :, first + a : first + b].float().norm(dim=-1)
                received[layer, :, first + a : first + b] = summed * norms
            return None

        ids = torch.tensor([inputs.layout.prefix_ids], device=model.device)
        advance = inputs.task("score compactor", n)
        cache = DynamicCache()  # every layer keeps every token: the observer indexes keys by position
        with kvc_attention_in(model), observe_attention(observer):
            for start in range(0, n, 2 * self.tile):  # tiles never straddle two forward passes
                chunk = ids[:, start : start + 2 * self.tile]
                model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
                advance(chunk.shape[1])
        pad = self.smoothing // 2
        smoothed = F.avg_pool1d(received.flatten(0, 1)[:, None], self.smoothing, 1, pad, count_include_pad=False)
        return smoothed[:, 0, :n].view(layers, kv_heads, n)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        geometry = inputs.geometry
        held = visible_positions(geometry) if geometry.windows is not None else None
        attention = zscore(self.attention_scores(inputs).cpu(), held)
        return attention + self.leverage_weight * zscore(self.leverage_scores(inputs).cpu(), held)
