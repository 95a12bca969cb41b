"""A transformers Cache whose KV heads each keep their own subset of the context, and the dense cache layers of a
loaded context.

Each layer holds, per KV head, only the kept context entries (memory ∝ kept, no padding), plus the tokens appended
since (question, answer), which every head sees in full. Kept entries already carry their original RoPE rotation;
new tokens get the positions they would have after the full context, because `get_seq_length()` reports the full
context length. Attention over it is `PrunedLayer.attend`, reached through kvc's registered attention function
(`kvzip_cli.attention`), so the model must use attn_implementation "kvc" (or "kvc_eager").

A sliding-window layer (Mistral, Gemma) lets a token at position p see only positions > p − window, so of a
context of n tokens a later token never sees positions ≤ n − window: both kinds of layer drop those at load.
"""

from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


def layer_windows(config: PreTrainedConfig) -> list[int | None]:
    """Each layer's sliding window (None: full attention), read from the config as transformers' DynamicCache does."""
    cfg = config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * cfg.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


class SlidingContextLayer(DynamicLayer):
    """A dense sliding-window layer over a loaded context: the context's last `window − 1` entries (all that a
    later token can see) and every token appended since, so that the cache can be reset to the context
    (transformers' DynamicSlidingWindowLayer also drops appended tokens, and then cannot be cropped)."""

    is_sliding = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, window: int):
        """keys/values (batch, kv_heads, context tokens, head_dim)."""
        super().__init__()
        self.context_length = keys.shape[-2]
        self.offset = max(self.context_length - (window - 1), 0)  # position of the first entry held
        self.update(keys[..., self.offset :, :], values[..., self.offset :, :])

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.keys.shape[-2] + cache_position.shape[0], self.offset

    def get_seq_length(self) -> int:
        return self.offset + self.keys.shape[-2]

    def crop(self, max_length: int) -> None:
        """Drop appended tokens beyond `max_length` positions; the context itself cannot be cropped."""
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        if max_length < self.context_length:
            raise ValueError(f"cannot crop a sliding-window layer of {self.context_length} context positions to "
                             f"{max_length}")
        keep = max_length - self.offset
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]


def dense_layer(keys: torch.Tensor, values: torch.Tensor, window: int | None) -> DynamicLayer:
    """A cache layer holding a loaded context, keys/values (batch, kv_heads, tokens, head_dim)."""
    if window is not None:
        return SlidingContextLayer(keys, values, window)
    layer = DynamicLayer()
    layer.update(keys, values)
    return layer


class PrunedLayer(CacheLayerMixin):
    """One layer: per-head context K/V, each (batch, kept_h, head_dim); new K/V (batch, kv_heads, new, head_dim).

    A sliding-window layer (`window`) also needs the kept entries' positions, per head (kept_h,) int: it drops the
    entries no later token can see and masks the others as the appended tokens move the window on."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], context_length: int,
                 window: int | None = None, positions: list[torch.Tensor] | None = None):
        super().__init__()
        if len(keys) != len(values) or not keys:
            raise ValueError("a pruned layer needs keys and values for at least one head")
        self.window, self.context_positions = window, None
        if window is not None:
            if positions is None or len(positions) != len(keys):
                raise ValueError("a sliding-window pruned layer needs the positions of every head's entries")
            positions = [p.to(keys[0].device) for p in positions]
            seen = [p > context_length - window for p in positions]
            keys = [k[:, s] for k, s in zip(keys, seen, strict=True)]
            values = [v[:, s] for v, s in zip(values, seen, strict=True)]
            self.context_positions = [p[s] for p, s in zip(positions, seen, strict=True)]
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

    def attend(self, query: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
        """query (batch, heads, q, head_dim), the last q of the appended tokens → output (batch, q, heads, head_dim).

        `softcap`: logits become softcap · tanh(logits / softcap) before the mask, as Gemma 2's eager attention."""
        kv_heads = len(self.context_keys)
        group = query.shape[1] // kv_heads
        q_len, new = query.shape[2], self.keys.shape[2]
        rows = torch.arange(q_len, device=query.device)[:, None] + (new - q_len)
        hidden = torch.arange(new, device=query.device)[None, :] > rows  # (q, new): the future
        if self.window is not None:
            hidden |= torch.arange(new, device=query.device)[None, :] <= rows - self.window
        outputs = []
        for h in range(kv_heads):
            q = query[:, h * group : (h + 1) * group]
            k_ctx, v_ctx = self.context_keys[h].unsqueeze(1), self.context_values[h].unsqueeze(1)
            k_new, v_new = self.keys[:, h : h + 1], self.values[:, h : h + 1]
            logits = torch.cat([q @ k_ctx.transpose(-1, -2), q @ k_new.transpose(-1, -2)], dim=-1) * scaling
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            logits[..., k_ctx.shape[2] :].masked_fill_(hidden, float("-inf"))
            if self.window is not None:  # context entry at p is out of the window of the query at context_length + row
                out = self.context_positions[h][None, :] <= rows + self.context_length - self.window
                logits[..., : k_ctx.shape[2]].masked_fill_(out, float("-inf"))
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
        tensors = [*self.context_keys, *self.context_values, *(self.context_positions or []), self.keys, self.values]
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

