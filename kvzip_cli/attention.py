"""kvc's attention function, registered with transformers under the names "kvc" and "kvc_eager".

It does two things the stock functions cannot:
- attend over a `PrunedLayer` (per-head variable-length context + the tokens appended since), so
  `model.generate(past_key_values=pruned_cache)` works once the model uses "kvc";
- let a scorer watch (and optionally compute) attention during a forward pass, via `observe_attention`.

Anything else is handed unchanged to the implementation the model used before: SDPA under "kvc", the model's own
eager function under "kvc_eager" (which keeps what SDPA drops, such as Gemma 2's logit soft-capping), so switching
a model to kvc's attention does not change its outputs.
"""

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .load.pruned_cache import PrunedLayer

NAME = "kvc"
EAGER_NAME = "kvc_eager"

# observer(layer_idx, query, key, value, scaling) -> attention output (batch, q, heads, head_dim), or None to leave
# it to the fallback.
# query: (batch, heads, q, head_dim); key/value: (batch, kv_heads, k, head_dim), post-RoPE, cache included.
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor | None]
_observers: list[Observer] = []


def _intercepted(module, query, key, value, scaling, kwargs) -> torch.Tensor | None:
    """What kvc computes itself: attention over a PrunedLayer, or an observer's; None leaves it to the fallback."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if isinstance(key, PrunedLayer):
        return key.attend(query, scaling, kwargs.get("softcap"))
    if _observers:
        return _observers[-1](module.layer_idx, query, key, value, scaling)
    return None


def kvc_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    out = _intercepted(module, query, key, value, scaling, kwargs)
    if out is not None:
        return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def kvc_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """`kvc_attention` falling back to the model's own eager function (every transformers modeling file defines
    one, and it is what the model calls without kvc)."""
    out = _intercepted(module, query, key, value, scaling, kwargs)
    if out is not None:
        return out, None
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, kvc_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
AttentionInterface.register(EAGER_NAME, kvc_eager_attention)
AttentionMaskInterface.register(EAGER_NAME, eager_mask)


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
    if previous not in (NAME, EAGER_NAME):
        model.set_attn_implementation(EAGER_NAME if previous == "eager" else NAME)
    return previous


@contextlib.contextmanager
def kvc_attention_in(model: PreTrainedModel) -> Iterator[None]:
    """`model` uses kvc's attention inside the block and its previous implementation after it."""
    previous = use_kvc_attention(model)
    try:
        yield
    finally:
        if previous not in (NAME, EAGER_NAME):
            model.set_attn_implementation(previous)

