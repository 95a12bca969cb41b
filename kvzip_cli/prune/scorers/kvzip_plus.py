"""KVzip+ (kvpress's `kvzip_plus_normalization`): KVzip's reconstruction attention, each weight scaled by what the
entry writes into the residual stream, ‖W_O v‖ (per query head, W_O that head's slice of the output projection),
and divided by the norm of the query token's attention input ‖h‖, before the maximum over the pass and the GQA
group. An entry a query attends to but whose value barely moves the output then scores low.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import UsageError
from .base import ScoringInputs
from .kvzip import KVzipScorer, max_received


def attention_modules(model: nn.Module) -> dict[int, tuple[nn.Module, nn.Linear]]:
    """layer index → (attention module, its output projection), for the decoder families kvc supports (`o_proj`;
    GPT-NeoX's `dense`)."""
    found = {}
    for module in model.modules():
        projection = getattr(module, "o_proj", None) or getattr(module, "dense", None)
        if isinstance(getattr(module, "layer_idx", None), int) and isinstance(projection, nn.Linear):
            found[module.layer_idx] = module, projection
    return found


def value_gram(projection: nn.Linear, heads: int) -> torch.Tensor:
    """(heads, head_dim, head_dim) float32: W_gᵀ W_g for each query head's slice W_g of the output projection, so that
    ‖W_g v‖² = vᵀ (W_gᵀ W_g) v."""
    weight = projection.weight.float()
    slices = weight.view(weight.shape[0], heads, -1).transpose(0, 1)  # (heads, hidden, head_dim)
    return slices.transpose(1, 2) @ slices


@dataclass
class KVzipPlusScorer(KVzipScorer):
    name: str = "kvzip-plus"
    _grams: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _input_norms: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _context_written: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # (heads, tokens) per layer

    @contextmanager
    def _watching_inputs(self, model: nn.Module) -> Iterator[None]:
        """Record each attention layer's input norms (q,) as the passes run, and the layers' value Grams."""
        modules = attention_modules(model)
        if len(modules) != model.config.get_text_config().num_hidden_layers:
            raise UsageError(f"scorer {self.name!r} cannot find every attention layer's output projection in "
                             f"{type(model).__name__}: use --scorer kvzip")
        heads = model.config.get_text_config().num_attention_heads

        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._input_norms[module.layer_idx] = hidden[0].float().norm(dim=-1)

        hooks = [module.register_forward_pre_hook(record, with_kwargs=True) for module, _ in modules.values()]
        self._grams.update({i: value_gram(projection, heads) for i, (_, projection) in modules.items()})
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self._grams.clear()
            self._input_norms.clear()

    @torch.inference_mode()
    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        with self._watching_inputs(inputs.model):
            # The context's entries are the same in every pass: what they write is computed once.
            self._context_written.update({i: self._written(i, layer.values[0])
                                          for i, layer in enumerate(inputs.cache.layers)})
            try:
                return super().score(inputs)
            finally:
                self._context_written.clear()

    def _written(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        """values (kv_heads, k, head_dim) → ‖W_g v‖ (heads, k) float32, for each query head g."""
        values = values.float()
        kv_heads, k_len, dim = values.shape
        gram = self._grams[layer].to(values.device).view(kv_heads, -1, dim, dim)
        return torch.einsum("hkd,hgde,hke->hgk", values, gram, values).clamp_min(0).sqrt().reshape(-1, k_len)

    def _received(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  seen: Callable[[torch.Tensor], torch.Tensor], scaling: float,
                  window: tuple[torch.Tensor, torch.Tensor, int] | None) -> torch.Tensor:
        context = self._context_written[layer]  # what the layer holds of the context (a window: its last entries)
        own = self._written(layer, value[0, :, context.shape[1] :])  # the pass's own tokens so far
        written = seen(torch.cat([context.to(own.device), own], dim=1)[None])[0]
        inverse_norm = 1 / self._input_norms[layer].to(own.device).clamp_min(torch.finfo(torch.float32).tiny)
        return max_received(query, seen(key), scaling, column=written, row=inverse_norm, window=window)
