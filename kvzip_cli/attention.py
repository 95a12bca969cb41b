"""kvc's attention function, registered with transformers under the name "kvc".

It does two things the stock functions cannot:
- attend over a `PrunedLayer` (per-head variable-length context + the tokens appended since), so
  `model.generate(past_key_values=pruned_cache)` works once the model uses "kvc";
- let a scorer watch (and optionally compute) attention during a forward pass, via `observe_attention`.

Anything else is handed to SDPA unchanged, so switching a model to "kvc" does not change its outputs.
"""

import contextlib
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import PrunedLayer

NAME = "kvc"

# observer(layer_idx, query, key, value, scaling) -> attention output (batch, q, heads, head_dim) or None for SDPA.
# query: (batch, heads, q, head_dim); key/value: (batch, kv_heads, k, head_dim), post-RoPE, cache included.
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor | None]
_observers: list[Observer] = []


def kvc_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if isinstance(key, PrunedLayer):
        return key.attend(query, scaling), None
    if _observers:
        out = _observers[-1](module.layer_idx, query, key, value, scaling)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


AttentionInterface.register(NAME, kvc_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def observe_attention(observer: Observer) -> Iterator[None]:
    """Call `observer` from every attention layer of models using "kvc" inside the block."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def use_kvc_attention(model: PreTrainedModel) -> str:
    """Switch `model` to kvc's attention (outputs unchanged for ordinary caches); returns the previous name."""
    previous = model.config._attn_implementation
    if previous != NAME:
        model.set_attn_implementation(NAME)
    return previous


@contextlib.contextmanager
def kvc_attention_in(model: PreTrainedModel) -> Iterator[None]:
    """`model` uses kvc's attention inside the block and its previous implementation after it."""
    previous = use_kvc_attention(model)
    try:
        yield
    finally:
        if previous != NAME:
            model.set_attn_implementation(previous)

