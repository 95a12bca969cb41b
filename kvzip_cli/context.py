"""A document's context as the model's own cache holds it (a sliding-window layer only its window), shared by
compress (which reads a prefilled cache) and load (which rebuilds one): the geometry, the per-layer windows, and
the dense cache layers of a loaded context."""

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from kvc_format import CacheGeometry

from .rope import head_dim


def layer_windows(config: PreTrainedConfig) -> list[int | None]:
    """Each layer's sliding window (None: full attention), read from the config as transformers' DynamicCache does."""
    cfg = config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * cfg.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


def context_geometry(model: PreTrainedModel, tokens: int) -> CacheGeometry:
    """A context of `tokens` as `model`'s own cache holds it: per layer every position, or a sliding-window layer's
    last window − 1 (`windows`, None for a model without windows). kvc_format's geometry does the arithmetic."""
    cfg = model.config.get_text_config(decoder=True)
    windows = layer_windows(model.config)
    return CacheGeometry(layers=cfg.num_hidden_layers,
                         kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                         tokens=tokens, head_dim=head_dim(model),
                         windows=tuple(windows) if any(w is not None for w in windows) else None)


class SlidingContextLayer(DynamicLayer):
    """A dense sliding-window layer over a loaded context: the context's last `window − 1` entries (all that a
    later token can see) and every token appended since, so that the cache can be reset to the context
    (transformers' DynamicSlidingWindowLayer also drops appended tokens, and then cannot be cropped)."""

    is_sliding = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, window: int, context_length: int):
        """keys/values (batch, kv_heads, n, head_dim): the context's last n positions (all of them in a file
        before format 1.6, the window's in later ones)."""
        super().__init__()
        self.context_length = context_length
        self.offset = max(context_length - (window - 1), 0)  # position of the first entry held
        skip = self.offset - (context_length - keys.shape[-2])
        self.update(keys[..., skip:, :], values[..., skip:, :])

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


def context_positions(held: torch.Tensor, tokens: int) -> torch.Tensor:
    """(kv_heads, tokens, head_dim) from a layer's keys or values (kv_heads, n, head_dim), the context's last n
    positions: zeros before them (a sliding-window layer's; nothing reads those, its own cache does not hold them)."""
    missing = tokens - held.shape[1]
    if missing == 0:
        return held
    return torch.cat([held.new_zeros(held.shape[0], missing, held.shape[2]), held], dim=1)


def context_kv(layer: CacheLayerMixin, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefilled layer's keys and values (kv_heads, tokens, head_dim) at every position of the context."""
    return context_positions(layer.keys[0], tokens), context_positions(layer.values[0], tokens)


def dense_layer(keys: torch.Tensor, values: torch.Tensor, window: int | None, context_length: int) -> DynamicLayer:
    """A cache layer holding a loaded context, keys/values (batch, kv_heads, n, head_dim): the context's last n
    positions (n = context_length but in a sliding-window layer, which needs only its window)."""
    if window is not None:
        return SlidingContextLayer(keys, values, window, context_length)
    layer = DynamicLayer()
    layer.update(keys, values)
    return layer
