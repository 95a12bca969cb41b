"""Chunked prefill: run the prefix through the model a chunk at a time so peak memory stays bounded."""

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer

from .context import SlidingContextLayer, layer_windows
from .progress import Advance


@torch.inference_mode()
def prefill(model: PreTrainedModel, prefix_ids: list[int], chunk_size: int, advance: Advance) -> DynamicCache:
    """KV cache of `prefix_ids` as the model's own cache holds it: a full-attention layer every token, keys and
    values (1, kv_heads, tokens, head_dim); a sliding-window layer (window W) the last W − 1, which is all a later
    token sees, in a `SlidingContextLayer` that takes appended tokens and crops back to the context (for the scoring
    passes and probes that run after the document). A window costs the prefill only its own attention span."""
    ids = torch.tensor([prefix_ids], device=model.device)
    cache = DynamicCache(config=model.config)
    for start in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, start : start + chunk_size]
        model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
        advance(chunk.shape[1])
    for i, (layer, window) in enumerate(zip(cache.layers, layer_windows(model.config), strict=True)):
        if isinstance(layer, DynamicSlidingWindowLayer):
            cache.layers[i] = SlidingContextLayer(layer.keys, layer.values, window, ids.shape[1])
    return cache
