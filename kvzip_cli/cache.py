"""A transformers Cache whose KV heads each keep their own subset of the context.

Each layer holds, per KV head, only the kept context entries (memory ∝ kept, no padding), plus the tokens appended
since (question, answer), which every head sees in full. Kept entries already carry their original RoPE rotation;
new tokens get the positions they would have after the full context, because `get_seq_length()` reports the full
context length. Attention over it is `PrunedLayer.attend`, reached through kvc's registered attention function
(`kvzip_cli.attention`), so the model must use attn_implementation "kvc".
"""

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PrunedLayer(CacheLayerMixin):
    """One layer: per-head context K/V, each (batch, kept_h, head_dim); new K/V (batch, kv_heads, new, head_dim)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], context_length: int):
        super().__init__()
        if len(keys) != len(values) or not keys:
            raise ValueError("a pruned layer needs keys and values for at least one head")
        self.context_keys, self.context_values = keys, values
        self.context_length = context_length
        first = keys[0]
        self.dtype, self.device = first.dtype, first.device
        empty = first.new_zeros(first.shape[0], len(keys), 0, first.shape[-1])
        self.keys, self.values = empty, empty.clone()  # the appended tokens
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple["PrunedLayer", "PrunedLayer"]:
        """Append new tokens to every head; the attention function receives this layer as key and value."""
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self, self

    @property
    def shape(self) -> torch.Size:
        """The logical (batch, kv_heads, positions, head_dim), for wrappers of attention functions that inspect `key`
        (kvpress patches every registered function this way)."""
        batch, heads, _, dim = self.keys.shape
        return torch.Size((batch, heads, self.get_seq_length(), dim))

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query (batch, heads, q, head_dim), the last q of the appended tokens → output (batch, q, heads, head_dim)."""
        kv_heads = len(self.context_keys)
        group = query.shape[1] // kv_heads
        q_len, new = query.shape[2], self.keys.shape[2]
        rows = torch.arange(q_len, device=query.device)[:, None] + (new - q_len)
        future = torch.arange(new, device=query.device)[None, :] > rows
        outputs = []
        for h in range(kv_heads):
            q = query[:, h * group : (h + 1) * group]
            k_ctx, v_ctx = self.context_keys[h].unsqueeze(1), self.context_values[h].unsqueeze(1)
            k_new, v_new = self.keys[:, h : h + 1], self.values[:, h : h + 1]
            logits = torch.cat([q @ k_ctx.transpose(-1, -2), q @ k_new.transpose(-1, -2)], dim=-1) * scaling
            logits[..., k_ctx.shape[2] :].masked_fill_(future, float("-inf"))
            weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
            n = k_ctx.shape[2]
            outputs.append(weights[..., :n] @ v_ctx + weights[..., n:] @ v_new)
        return torch.cat(outputs, dim=1).transpose(1, 2).contiguous()

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_seq_length(self) -> int:
        return self.context_length + self.keys.shape[-2]

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        """Drop appended tokens beyond `max_length` positions; the pruned context itself cannot be cropped."""
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        if max_length < self.context_length:
            raise ValueError(f"cannot crop a pruned cache of {self.context_length} context positions to {max_length}")
        keep = max_length - self.context_length
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]

    def reset(self) -> None:
        self.crop(self.context_length)

    def kept_per_head(self) -> list[int]:
        return [k.shape[-2] for k in self.context_keys]

    def nbytes(self) -> int:
        tensors = [*self.context_keys, *self.context_values, self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in tensors)


def cache_bytes(cache: Cache) -> int:
    """Bytes of K/V a cache holds: a PrunedCache exactly its kept entries (no padding), a dense one every layer's."""
    if isinstance(cache, PrunedCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class PrunedCache(Cache):
    """Pass as `past_key_values` to a model that uses attn_implementation "kvc" (see `use_kvc_attention`)."""

    def __init__(self, layers: list[PrunedLayer]):
        super().__init__(layers=layers)

    @property
    def context_length(self) -> int:
        return self.layers[0].context_length

    def kept_ratio(self) -> float:
        kept = sum(sum(layer.kept_per_head()) for layer in self.layers)
        return kept / (len(self.layers) * len(self.layers[0].context_keys) * self.context_length)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (no padding: each head stores exactly its kept entries)."""
        return sum(layer.nbytes() for layer in self.layers)

