"""Quantizing a layer's kept keys and values for a `.kvc` file: the steps per bit width, the key units, RoPE
removed from keys where it can be re-applied at load, and the layer encoded by kvc_format.quantized."""

from dataclasses import dataclass

import numpy as np
import torch

from kvc_format.quantized import Quantization, encode_layer

from ..errors import KvcError
from ..prune.budget import SINK_TOKENS
from ..rope import inverse_frequencies, rope_tables, unrecordable_rope, unrotate
from .key_units import key_units
from .prefilled import Prefilled
from .settings import QuantOptions

# Quantization steps at 4 bits, as fractions of the key units (kvzip_cli.compress.key_units: on average each head's
# key RMS) and of each value row's RMS; every bit added halves them. Chosen on the example corpus with one key step
# per head (studies/bench-corpus/results/quantization/): 4 bits gave kld ≈ 0.005 at ≈ 3.6 bits per element once
# entropy-coded.
KEY_STEP_AT_4_BITS = 0.15


VALUE_STEP_AT_4_BITS = 0.3


def key_step(bits: int) -> float:
    return KEY_STEP_AT_4_BITS * 2.0 ** (4 - bits)


def value_step(bits: int) -> float:
    return VALUE_STEP_AT_4_BITS * 2.0 ** (4 - bits)


def kept_positions(keep: torch.Tensor) -> list[torch.Tensor]:
    return [row.nonzero().squeeze(-1) for row in keep.cpu()]


def value_group(options: QuantOptions, head_dim: int) -> int:
    group = min(options.value_group or head_dim, head_dim)
    if head_dim % group:
        raise KvcError(f"--group {group} must divide the model's head_dim ({head_dim})")
    return group


def _key_units(pre: Prefilled, rotary: int) -> np.ndarray | None:
    """(layers, kv_heads, head_dim) query-weighted key steps at key_step 1, or None (per-head RMS steps)."""
    if pre.query_energy is None:
        return None
    # RoPE rotates channel pairs, so it leaves each head's key RMS unchanged: the stored keys' RMS either way (over
    # what each layer holds: a sliding-window layer its window).
    rms = torch.stack([layer.keys[0].float().pow(2).mean((1, 2)).sqrt() for layer in pre.cache.layers])
    return key_units(pre.query_energy, rms.double().cpu().numpy(), rotary)


@dataclass(frozen=True)
class LayerQuantizer:
    """What a quantized write applies to every layer: kvc_format's Quantization, the RoPE tables that remove RoPE from
    the keys (None: stored as computed), the per-layer key units (None: per-head RMS steps), and the header fields
    that record them."""

    quant: Quantization
    tables: tuple[torch.Tensor, torch.Tensor] | None
    units: np.ndarray | None
    fields: dict

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor):
        """keys/values (kv_heads, tokens, head_dim), keep (kv_heads, tokens) → the kv_layer_quantized streams and
        section attributes."""
        unit = self.units[layer] if self.units is not None else None
        return quantized_layer(keys, values, keep, self.quant, self.tables, unit)


def layer_quantizer(pre: Prefilled, bits: int, codec: str, options: QuantOptions) -> LayerQuantizer:
    """The quantizer of a write at `bits` (values; keys at `options.key_bits` or the same) with `codec`."""
    tables, inv_freq = None, None
    if options.pre_rope is not False:
        tables = rope_tables(pre.lm.model, torch.arange(pre.tokens))
        inv_freq = inverse_frequencies(pre.lm.model, *tables) if tables is not None else None
        tables = tables if inv_freq is not None else None
        if tables is None and options.pre_rope:
            raise KvcError(f"--pre-rope: model {pre.lm.name!r} {unrecordable_rope(pre.lm.model)}; use --no-pre-rope")
    head_dim = pre.identity["head_dim"]
    group = value_group(options, head_dim)
    key_bits = options.key_bits or bits
    quant = Quantization(value_mode="uniform", value_step=value_step(bits), value_group=group,
                         key_step=key_step(key_bits), exact_positions=SINK_TOKENS,
                         coder="rans" if codec == "ans" else codec)
    rotary = tables[0].shape[-1] if tables is not None else 0  # channels stored with RoPE removed
    units = _key_units(pre, rotary) if options.query_weighted_keys else None
    fields = {"exact_positions": SINK_TOKENS, "key_rope": "removed" if tables is not None else "applied",
              "rope_inv_freq": inv_freq, "value_group": group, "value_step": quant.value_step, "key_bits": key_bits,
              "key_step": quant.key_step, "key_units": "query" if units is not None else "rms"}
    return LayerQuantizer(quant, tables, units, fields)


def _kept_rows(cache: torch.Tensor, positions: list[torch.Tensor]) -> np.ndarray:
    """cache (kv_heads, tokens, head_dim) → (kept, head_dim) float32, the kept rows in head order."""
    return torch.cat([cache[h, p] for h, p in enumerate(positions)]).float().numpy()


def quantized_layer(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, quant: Quantization,
                     tables: tuple[torch.Tensor, torch.Tensor] | None, key_unit: np.ndarray | None):
    """keys/values (kv_heads, tokens, head_dim) → the kv_layer_quantized streams and section attributes."""
    keys, values = keys.float().cpu(), values.float().cpu()
    if tables is not None:
        keys = unrotate(keys, *(t.cpu() for t in tables))
    positions = kept_positions(keep)
    try:
        return encode_layer(_kept_rows(keys, positions), _kept_rows(values, positions),
                            [p.numpy() for p in positions], quant, key_unit)
    except ValueError as exc:
        raise KvcError(f"cannot quantize this cache: {exc}") from None
