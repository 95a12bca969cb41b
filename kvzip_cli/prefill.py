"""Chunked prefill: run the prefix through the model a chunk at a time so peak memory stays bounded."""

import torch
from transformers import DynamicCache, PreTrainedModel

from .progress import Advance


@torch.inference_mode()
def prefill(model: PreTrainedModel, prefix_ids: list[int], chunk_size: int, advance: Advance) -> DynamicCache:
    """KV cache of `prefix_ids`; layer i holds keys and values of shape (1, kv_heads, tokens, head_dim).

    Every layer keeps every token, sliding-window layers included (the model's masks still apply the window), so
    that the whole context can be scored and stored."""
    ids = torch.tensor([prefix_ids], device=model.device)
    cache = DynamicCache()
    for start in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, start : start + chunk_size]
        model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
        advance(chunk.shape[1])
    return cache
