"""Key quantization steps weighted by the queries that will read the keys.

A key's quantization error δk reaches the model as an attention-logit error q·δk, of variance
Σ_c E[q_c²] × step_c² / 12 over the queries. For a fixed number of bits (Σ_c log step_c fixed) that is least when
each channel's step is proportional to 1 / sqrt(E[q_c²]): channels the queries read strongly get finer steps, the
ones they barely read coarser steps. E[q_c²] is measured on the document's own prefill (every position; the query
heads sharing a KV head summed), so no question is needed. When keys are stored with RoPE removed, the two channels
of each rotated pair share their energy, since the rotation mixes them. The units are then scaled so that their
geometric mean over the whole cache equals that of the per-head key RMS they replace: the same `key_step` spends
about the same bits, spread where the logits need them.
"""

import numpy as np
import torch

ENERGY_FLOOR = 1e-4  # relative to the layer's strongest channel: bounds how much coarser a barely-read channel gets


class QueryEnergy:
    """An attention observer (kvzip_cli.attention.observe_attention) that averages q² per (layer, query head,
    channel) over every position it sees; it leaves the attention itself to SDPA."""

    def __init__(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}
        self._positions: dict[int, int] = {}

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scaling: float) -> None:
        """query (batch, heads, q, head_dim)."""
        energy = query.float().pow(2).sum((0, 2))
        self._sums[layer] = self._sums[layer] + energy if layer in self._sums else energy
        self._positions[layer] = self._positions.get(layer, 0) + query.shape[0] * query.shape[2]

    def mean(self) -> np.ndarray | None:
        """(layers, heads, head_dim) float64 mean q², or None if some layer was never observed."""
        layers = len(self._sums)
        if not layers or sorted(self._sums) != list(range(layers)):
            return None
        return np.stack([(self._sums[i] / self._positions[i]).double().cpu().numpy() for i in range(layers)])


def key_units(energy: np.ndarray, key_rms: np.ndarray, rotary: int) -> np.ndarray | None:
    """energy (layers, heads, head_dim): mean q² per query head and channel; key_rms (layers, kv_heads): each head's
    key RMS; rotary: how many leading channels are stored with RoPE removed (0: none; head_dim, or fewer for partial
    rotary), rotate-half pairs c, c + rotary/2.
    → (layers, kv_heads, head_dim) key steps at key_step 1, or None where the statistics are degenerate (a layer
    whose queries are all zero, a head whose keys are), leaving the per-head RMS steps."""
    layers, heads, dim = energy.shape
    kv_heads = key_rms.shape[1]
    if key_rms.shape[0] != layers or heads % kv_heads or rotary % 2 or rotary > dim:
        return None
    e = energy.reshape(layers, kv_heads, heads // kv_heads, dim).sum(2)
    if rotary:
        half = rotary // 2
        shared = (e[..., :half] + e[..., half:rotary]) / 2
        e = np.concatenate([shared, shared, e[..., rotary:]], -1)
    strongest = e.max(axis=(1, 2), keepdims=True)
    if not (np.isfinite(e).all() and (strongest > 0).all() and np.isfinite(key_rms).all() and (key_rms > 0).all()):
        return None
    log_unit = -0.5 * np.log(np.maximum(e, ENERGY_FLOOR * strongest))
    log_unit += np.log(key_rms).mean() - log_unit.mean()
    units = np.exp(log_unit)
    return units if np.isfinite(units).all() and (units > 0).all() else None
