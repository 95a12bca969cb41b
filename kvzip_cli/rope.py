"""Rotary position embedding (rotate-half convention, as transformers' Llama, Qwen2, Mistral... apply it to keys;
with partial rotary, as Phi-3 and GPT-NeoX, on the first channels of the head only).

Keys can be stored with RoPE removed (their channels then keep a stable scale across positions, which quantizes
better) and rotated again at load, with the model's own `rotary_emb` (so scaled-frequency variants match), always
evaluated over positions 0 … tokens − 1 (so dynamic variants give the same angles at write and at load).
"""

import torch
from transformers import PreTrainedModel


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: the rotation by -θ of the first cos.shape[-1] channels (all of them but for partial rotary)."""
    return _on_rotary_part(keys, cos.shape[-1], lambda k: k * cos - rotate_half(k) * sin)


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: the rotation by θ of the first cos.shape[-1] channels (all of them but for partial rotary)."""
    return _on_rotary_part(keys, cos.shape[-1], lambda k: k * cos + rotate_half(k) * sin)


def _on_rotary_part(keys: torch.Tensor, width: int, turn) -> torch.Tensor:
    if width == keys.shape[-1]:
        return turn(keys)
    return torch.cat([turn(keys[..., :width]), keys[..., width:]], dim=-1)


def head_dim(model: PreTrainedModel) -> int:
    cfg = model.config.get_text_config()
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rotary_embedding(model: PreTrainedModel) -> torch.nn.Module | None:
    return getattr(model.base_model, "rotary_emb", None)


def layer_rope_tables(model: PreTrainedModel, positions: torch.Tensor
                      ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer, (cos, sin), each (len(positions), rotary_dim) float32, rotary_dim ≤ head_dim (less for partial
    rotary: RoPE turns the first rotary_dim channels); layers of a type share one table (Gemma 3 has one per layer
    type). None when the model has no `rotary_emb` this module knows."""
    rotary = rotary_embedding(model)
    if rotary is None:
        return None
    probe = torch.zeros(1, device=model.device, dtype=torch.float32)
    positions = positions.to(model.device)[None]
    cfg = model.config.get_text_config()
    if getattr(rotary, "layer_types", None) is None:
        return [_normalised(*rotary(probe, positions))] * cfg.num_hidden_layers
    by_type = {kind: _normalised(*rotary(probe, positions, kind)) for kind in set(cfg.layer_types)}
    return [by_type[kind] for kind in cfg.layer_types]


def _normalised(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos[0].float(), sin[0].float()
    # YaRN and LongRoPE scale cos and sin by an attention factor; remove it so that rotate and unrotate are exact
    # inverses (the factor stays in the keys as computed).
    norm = (cos**2 + sin**2).sqrt()
    return cos / norm, sin / norm


def rope_tables(model: PreTrainedModel, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin), each (len(positions), rotary_dim) float32 (as `layer_rope_tables`), shared by every layer, or None
    when the model has no such rotary embedding (none at all, or tables that differ between layers)."""
    tables = layer_rope_tables(model, positions)
    if tables is None or any(t is not tables[0] for t in tables):
        return None
    return tables[0]


def unrecordable_rope(model: PreTrainedModel) -> str:
    """Why a .kvc file cannot hold `model`'s keys with RoPE removed, for an error message."""
    tables = layer_rope_tables(model, torch.arange(2))
    if tables is None:
        return "has no rotary embedding kvc knows"
    if any(t is not tables[0] for t in tables):
        return "uses a different RoPE per layer type, and a .kvc file records one RoPE for all layers"
    return "has rotary tables not of the standard form (cos/sin of position x frequency) that a .kvc file records"


def inverse_frequencies(model: PreTrainedModel, cos: torch.Tensor, sin: torch.Tensor) -> list[float] | None:
    """The rotary frequencies f (rotary_dim / 2) such that the normalised tables over positions 0 … n − 1 are
    cos/sin of concat(p·f, p·f) in float32 (recorded in the file so that readers without the model can re-apply
    RoPE), or None when the model's rotary embedding is not of that form."""
    inv_freq = getattr(rotary_embedding(model), "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor) or 2 * inv_freq.numel() != cos.shape[-1]:
        return None
    freqs = inv_freq.detach().float().cpu()
    if not bool(((freqs > 0) & (freqs <= 1)).all()):  # the range SPEC.md allows (every base above 1 gives it)
        return None
    angles = torch.arange(cos.shape[0], dtype=torch.float32)[:, None] * freqs[None]
    angles = torch.cat([angles, angles], dim=-1)
    if not (torch.allclose(angles.cos(), cos.cpu(), atol=1e-4) and torch.allclose(angles.sin(), sin.cpu(), atol=1e-4)):
        return None
    return freqs.tolist()
