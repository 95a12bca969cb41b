"""A transformers Cache whose KV heads each keep their own subset of the context, and the dense cache layers of a
loaded context.

Each layer holds, per KV head, only the kept context entries (memory ∝ kept, no padding to the longest head), plus
the tokens appended since (question, answer), which every head sees in full, and a little room for more. Kept
entries already carry their original RoPE rotation; new tokens get the positions they would have after the full
context, because `get_seq_length()` reports the full context length. Attention over it is `PrunedLayer.attend`,
reached through kvc's registered attention function (`kvzip_cli.attention`), so the model must use
attn_implementation "kvc" (or "kvc_eager").

A sliding-window layer (Mistral, Gemma) lets a token at position p see only positions > p − window, so of a
context of n tokens a later token never sees positions ≤ n − window: both kinds of layer drop those at load.
"""

import math
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PrunedLayer(CacheLayerMixin):
    """One layer: per-head context K/V, each (batch, kept_h, head_dim); new K/V (batch, kv_heads, new, head_dim).

    Each head's context and the tokens appended since lie next to each other in one buffer per layer (room for
    appended tokens after every head's context, doubled when it runs out), so a head attends with one call over one
    contiguous block and appending writes all heads with one copy.

    A sliding-window layer (`window`) also needs the kept entries' positions, per head (kept_h,) int: it drops the
    entries no later token can see and masks the others as the appended tokens move the window on.

    `bias`, per head (kept_h,): a logit added to each kept entry's attention score (kvzip_cli.prune.refit), or None."""

    ROOM = 64  # appended tokens each head has room for at first

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], context_length: int,
                 window: int | None = None, positions: list[torch.Tensor] | None = None,
                 bias: list[torch.Tensor] | None = None):
        super().__init__()
        if len(keys) != len(values) or not keys:
            raise ValueError("a pruned layer needs keys and values for at least one head")
        if bias is not None and [len(b) for b in bias] != [k.shape[1] for k in keys]:
            raise ValueError("a pruned layer's bias needs one value per kept entry of every head")
        self.window, self.context_positions = window, None
        if window is not None:
            if positions is None or len(positions) != len(keys):
                raise ValueError("a sliding-window pruned layer needs the positions of every head's entries")
            positions = [p.to(keys[0].device) for p in positions]
            seen = [p > context_length - window for p in positions]
            keys = [k[:, s] for k, s in zip(keys, seen, strict=True)]
            values = [v[:, s] for v, s in zip(values, seen, strict=True)]
            self.context_positions = [p[s] for p, s in zip(positions, seen, strict=True)]
            if bias is not None:
                bias = [b.to(s.device)[s] for b, s in zip(bias, seen, strict=True)]
        self.context_length = context_length
        self.kept = [k.shape[1] for k in keys]
        first = keys[0]
        self.dtype, self.device = first.dtype, first.device
        empty = first.new_zeros(first.shape[0], len(keys), 0, first.shape[-1])
        self.keys, self.values = empty, empty.clone()  # the appended tokens
        self._allocate(keys, values, self.ROOM, bias)
        self.is_initialized = True

    def _allocate(self, keys: list[torch.Tensor], values: list[torch.Tensor], room: int,
                  bias: list[torch.Tensor] | None) -> None:
        """Lay out each head's context, then its appended tokens (self.keys), then free room, in one buffer; any bias
        in a buffer of the same layout, 0 for the appended tokens and the room."""
        self.room = room
        self.starts = [0]
        for n in self.kept[:-1]:
            self.starts.append(self.starts[-1] + n + room)
        batch, dim = keys[0].shape[0], keys[0].shape[-1]
        total = sum(self.kept) + len(self.kept) * room
        self.buffer_keys = keys[0].new_empty(batch, total, dim)  # the free room is never read
        self.buffer_values = keys[0].new_empty(batch, total, dim)
        new = self.keys.shape[2]
        for h, (start, n) in enumerate(zip(self.starts, self.kept, strict=True)):
            for buffer, context, appended in ((self.buffer_keys, keys[h], self.keys), (self.buffer_values, values[h],
                                                                                     self.values)):
                buffer[:, start : start + n] = context
                buffer[:, start + n : start + n + new] = appended[:, h]
        self._append_at = torch.tensor([start + n for start, n in zip(self.starts, self.kept, strict=True)],
                                       device=self.device)
        self.buffer_bias = None
        if bias is not None:
            self.buffer_bias = keys[0].new_zeros(total)
            for start, n, head_bias in zip(self.starts, self.kept, bias, strict=True):
                self.buffer_bias[start : start + n] = head_bias

    @property
    def context_keys(self) -> list[torch.Tensor]:
        """Per head, the kept context keys (batch, kept_h, head_dim): views into the layer's buffer."""
        return [self.buffer_keys[:, s : s + n] for s, n in zip(self.starts, self.kept, strict=True)]

    @property
    def context_bias(self) -> list[torch.Tensor] | None:
        """Per head, the kept entries' logit bias (kept_h,), views into the bias buffer; None without a bias."""
        if self.buffer_bias is None:
            return None
        return [self.buffer_bias[s : s + n] for s, n in zip(self.starts, self.kept, strict=True)]

    @property
    def context_values(self) -> list[torch.Tensor]:
        return [self.buffer_values[:, s : s + n] for s, n in zip(self.starts, self.kept, strict=True)]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple["PrunedLayer", "PrunedLayer"]:
        """Append new tokens to every head; the attention function receives this layer as key and value."""
        held, new = self.keys.shape[2], key_states.shape[2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if held + new > self.room:
            self._allocate(self.context_keys, self.context_values, max(2 * self.room, held + new), self.context_bias)
        else:
            rows = (self._append_at[:, None] + torch.arange(held, held + new, device=self.device)).reshape(-1)
            batch, heads, _, dim = key_states.shape
            self.buffer_keys.index_copy_(1, rows, key_states.reshape(batch, heads * new, dim))
            self.buffer_values.index_copy_(1, rows, value_states.reshape(batch, heads * new, dim))
        return self, self

    @property
    def shape(self) -> torch.Size:
        """The logical (batch, kv_heads, positions, head_dim), for wrappers of attention functions that inspect `key`
        (kvpress patches every registered function this way)."""
        batch, heads, _, dim = self.keys.shape
        return torch.Size((batch, heads, self.get_seq_length(), dim))

    def attend(self, query: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
        """query (batch, heads, q, head_dim), the last q of the appended tokens → output (batch, q, heads, head_dim).

        One attention call per KV head, its query heads stacked as rows (they share the head's keys and mask).
        `softcap`: logits become softcap · tanh(logits / softcap) before the mask, as Gemma 2's eager attention."""
        kv_heads = len(self.kept)
        batch, heads, q_len, dim = query.shape
        group = heads // kv_heads
        new = self.keys.shape[2]
        rows = torch.arange(q_len, device=query.device)[:, None] + (new - q_len)
        columns = torch.arange(new, device=query.device)[None, :]
        seen_new = columns <= rows  # (q, new): not the future
        if self.window is not None:
            seen_new &= columns > rows - self.window
        masked = q_len > 1 or self.window is not None
        outputs = []
        for h, (start, n) in enumerate(zip(self.starts, self.kept, strict=True)):
            q = query[:, h * group : (h + 1) * group].reshape(batch, 1, group * q_len, dim)
            k = self.buffer_keys[:, None, start : start + n + new]
            v = self.buffer_values[:, None, start : start + n + new]
            mask = None
            if masked:
                context = torch.ones(q_len, n, dtype=torch.bool, device=query.device)
                if self.window is not None:  # the entry at p is out of the window of the query at context + row
                    context = self.context_positions[h][None, :] > rows + self.context_length - self.window
                mask = torch.cat([context, seen_new], dim=1).repeat(group, 1)
            if self.buffer_bias is not None:  # a float mask: added to the logits (after the softcap), −inf where masked
                added = self.buffer_bias[None, start : start + n + new]  # one row: it broadcasts over the queries
                mask = added if mask is None else added.expand(mask.shape).masked_fill(~mask, -math.inf)
            if softcap is None:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
            else:
                logits = torch.tanh((q @ k.transpose(-1, -2)) * scaling / softcap) * softcap
                if mask is not None and mask.dtype == torch.bool:
                    logits = logits.masked_fill(~mask, float("-inf"))
                elif mask is not None:
                    logits = logits + mask
                out = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype) @ v
            outputs.append(out.reshape(batch, group, q_len, dim))
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
        return list(self.kept)

    def nbytes(self) -> int:
        """Bytes of the kept entries and the appended tokens (the buffer's free room not counted)."""
        tensors = [*self.context_keys, *self.context_values, *(self.context_positions or []),
                   *(self.context_bias or []), self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in tensors)


def cache_bytes(cache: Cache) -> int:
    """Bytes of K/V a cache holds: a PrunedCache its kept entries and appended tokens (not the free room of its
    buffers), a dense one every layer's."""
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
        """Bytes of the kept entries and appended tokens (each head stores exactly its kept entries; the buffers'
        free room, 64 tokens per head at first, is not counted)."""
        return sum(layer.nbytes() for layer in self.layers)
