"""Re-apply rotary position embedding to keys stored without it (SPEC.md §4.3, `key_rope = "removed"`)."""

from collections.abc import Sequence

import numpy as np


def apply_rope(keys: np.ndarray, positions: np.ndarray, inv_freq: Sequence[float]) -> np.ndarray:
    """keys (rows, head_dim) float32 stored without RoPE, positions (rows,) → the keys the model cached, float32.

    Angles are float32(position) × float32(frequency) in float32, as the writer's model computed them; RoPE acts
    on the halves of the first 2 × len(inv_freq) channels (the rotate-half convention; fewer than head_dim for
    partial rotary, the other channels carry no rotation)."""
    freqs = np.asarray(inv_freq, dtype=np.float32)
    angles = np.asarray(positions).astype(np.float32)[:, None] * freqs[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    half = freqs.size
    first, second, rest = keys[:, :half], keys[:, half : 2 * half], keys[:, 2 * half :]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin, rest], axis=1).astype(np.float32)


def rotate_rows(keys: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Apply RoPE in place to keys (rows, head_dim) float32 stored without it, from the model's own tables: cos and
    sin (tokens, rotary_dim / 2) float32, their first halves (rotate-half tables repeat themselves), positions
    (rows,) the rows' positions. Each product and sum is rounded to float32 as the model's rotation rounds them."""
    half = cos.shape[1]
    c, s = cos[positions], sin[positions]
    first, second = keys[:, :half], keys[:, half : 2 * half]
    first_sin, second_sin = first * s, second * s
    first *= c
    first -= second_sin
    second *= c
    second += first_sin
