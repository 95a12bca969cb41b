"""NVIDIA kvpress presses as peers, run as shipped: the press wraps the context prefill, then we ask questions.

kvpress's `compression_ratio` is the fraction *removed*; kvc's ratios are the fraction *kept*.
"""

import importlib.util
import logging
import time

import torch
from transformers import DynamicCache

from ..errors import KvcError
from ..models.loading import LoadedModel
from .sweep import PEERS  # noqa: F401 (the registry, re-exported where the presses run)


def kvpress_available() -> bool:
    return importlib.util.find_spec("kvpress") is not None


def require_kvpress() -> None:
    if not kvpress_available():
        raise KvcError("--peers needs NVIDIA kvpress: pip install 'kvc[bench]' (or pip install kvpress)")


def clear_masks(lm: LoadedModel) -> None:
    """KVzipPress leaves per-layer masked key indices on the attention modules; they must not leak."""
    for layer in lm.model.model.layers:
        layer.self_attn.masked_key_indices = None


def _kept_fraction(lm: LoadedModel, cache: DynamicCache, context_length: int) -> float:
    layers = lm.model.model.layers
    heads = cache.layers[0].keys.shape[1]
    total = len(layers) * heads * context_length
    stored = sum(layer.keys.shape[-2] * heads for layer in cache.layers)
    masked = sum(
        len(m[0]) for m in (getattr(layer.self_attn, "masked_key_indices", None) for layer in layers) if m is not None
    )
    return (stored - masked) / total


@torch.inference_mode()
def run_press(name: str, kept_ratio: float, lm: LoadedModel,
              prefix_ids: list[int]) -> tuple[DynamicCache, float, float]:
    """Prefill `prefix_ids` under press `name` keeping `kept_ratio`; returns (cache, realised kept ratio, seconds)."""
    import kvpress

    for logger in ("kvpress", "kvpress.presses.kvzip_press"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    press = getattr(kvpress, name)(compression_ratio=1.0 - kept_ratio)
    cache = DynamicCache(config=lm.model.config)
    ids = torch.tensor([prefix_ids], device=lm.model.device)
    clear_masks(lm)
    started = time.perf_counter()
    with press(lm.model):
        lm.model.model(input_ids=ids, past_key_values=cache)
    seconds = time.perf_counter() - started
    return cache, _kept_fraction(lm, cache, len(prefix_ids)), seconds
