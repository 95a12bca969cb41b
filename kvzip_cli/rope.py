"""Rotary position embedding (rotate-half convention, as transformers' Llama, Qwen2, Mistral... apply it to keys).

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
    """Undo RoPE: the rotation by -θ."""
    return keys * cos - rotate_half(keys) * sin


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: the rotation by θ."""
    return keys * cos + rotate_half(keys) * sin


def head_dim(model: PreTrainedModel) -> int:
    cfg = model.config.get_text_config()
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rope_tables(model: PreTrainedModel, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin), each (len(positions), head_dim) float32, or None when the model has no full-width rotary
    embedding this module can invert (no `rotary_emb`, or RoPE on part of the head only)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return None
    probe = torch.zeros(1, device=model.device, dtype=torch.float32)
    cos, sin = rotary(probe, positions.to(model.device)[None])
    if cos.shape[-1] != head_dim(model):
        return None
    cos, sin = cos[0].float(), sin[0].float()
    # YaRN and LongRoPE scale cos and sin by an attention factor; remove it so that rotate and unrotate are exact
    # inverses (the factor stays in the keys as computed).
    norm = (cos**2 + sin**2).sqrt()
    return cos / norm, sin / norm


def inverse_frequencies(model: PreTrainedModel, cos: torch.Tensor, sin: torch.Tensor) -> list[float] | None:
    """The rotary frequencies f (head_dim / 2) such that the normalised tables over positions 0 … n − 1 are
    cos/sin of concat(p·f, p·f) in float32 (recorded in the file so that readers without the model can re-apply
    RoPE), or None when the model's rotary embedding is not of that form."""
    inv_freq = getattr(model.model.rotary_emb, "inv_freq", None)
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
