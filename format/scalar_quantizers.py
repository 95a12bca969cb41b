"""Scalar quantizers of kept K/V rows (SPEC.md §4.3, `kv_layer_quantized`). numpy only.

Keys are quantized per channel with one step per (head, channel): symbol = round((k - zero) / step), where the step
is `key_step` × a unit step, and the zero point centres each channel's mean on symbol 128. The unit is the writer's
choice: by default the head's key RMS (so steps track the scale of each head, not of each channel: wide channels get
more levels, which the bench showed is what attention needs); kvc passes steps weighted by how strongly queries
read each channel (kvzip_cli.compress.key_units). Values are quantized per token, each row cut into groups of
`value_group` channels, two ways:
- `uniform` (for entropy coding): step = `value_step` × the group's RMS, symbol = round(v / step) + 128, no zero
  point stored. The step, not a bit width, sets the error; the entropy coder spends bits only where values vary.
- `minmax` (KIVI, fixed rate): zero point = the group's minimum (rounded down), step = (max - zero) / (2^bits - 1).
Steps and zero points are stored as float16.

Rows are a layer's kept entries, head 0's first (the pruned layout's order); `rows_per_head` gives the split.
"""

from typing import NamedTuple

import numpy as np

KEY_CENTRE = 128
KEY_LEVELS = 256


class KeyCode(NamedTuple):
    symbols: np.ndarray  # (rows, head_dim) uint8
    zero: np.ndarray  # (kv_heads, head_dim) float32
    step: np.ndarray  # (kv_heads, head_dim) float32


class ValueCode(NamedTuple):
    symbols: np.ndarray  # (rows, head_dim) uint8
    zero: np.ndarray  # (rows, head_dim // group) float16, or (0, head_dim // group): uniform, zero = -128 × step
    step: np.ndarray  # (rows, head_dim // group) float16


def head_index(rows_per_head: np.ndarray) -> np.ndarray:
    """(rows,) the head each row belongs to."""
    return np.repeat(np.arange(len(rows_per_head)), rows_per_head)


def quantize_keys(keys: np.ndarray, rows_per_head: np.ndarray, key_step: float,
                  unit: np.ndarray | None = None) -> KeyCode:
    """keys (rows, head_dim) float32 → symbols in [0, 255] with at most step/2 error per element. `unit`
    (kv_heads, head_dim), finite and > 0: each (head, channel)'s step at key_step 1; default the head's key RMS."""
    heads, dim = len(rows_per_head), keys.shape[1]
    zero = np.zeros((heads, dim), np.float32)
    step = np.ones((heads, dim), np.float32)
    symbols = np.empty(keys.shape, np.uint8)
    start = 0
    for h, n in enumerate(rows_per_head):
        block = keys[start : start + n].astype(np.float64)
        if n:
            mean = block.mean(0)
            spread = np.abs(block - mean).max(0)
            base = np.sqrt(np.mean(block**2)) if unit is None else unit[h].astype(np.float64)
            # The widest channel decides the least step that keeps every symbol within [0, 255].
            s = np.maximum(key_step * base, spread / (KEY_CENTRE - 1))
            s = np.maximum(s, np.finfo(np.float32).tiny).astype(np.float32)
            z = (mean - KEY_CENTRE * s.astype(np.float64)).astype(np.float32)
            q = np.rint((block - z) / s)
            symbols[start : start + n] = np.clip(q, 0, KEY_LEVELS - 1)
            zero[h], step[h] = z, s
        start += n
    return KeyCode(symbols, zero, step)


def dequantize_keys(code: KeyCode, rows_per_head: np.ndarray) -> np.ndarray:
    """(rows, head_dim) float32: symbol × step + zero of the row's head."""
    heads = head_index(rows_per_head)
    return code.symbols.astype(np.float32) * code.step[heads] + code.zero[heads]


def quantize_values(values: np.ndarray, bits: int, group: int) -> ValueCode:
    """values (rows, head_dim) float32 → symbols in [0, 2^bits - 1], per (row, group of `group` channels)."""
    rows, dim = values.shape
    top = (1 << bits) - 1
    grouped = values.reshape(rows, dim // group, group).astype(np.float32)
    low = grouped.min(-1)
    zero = low.astype(np.float16)
    # Round the zero point down, never above the group's minimum, so the step below cannot turn negative.
    zero = np.where(zero.astype(np.float32) > low, np.nextafter(zero, np.float16(-np.inf)), zero)
    z = zero.astype(np.float32)[..., None]
    step = ((grouped.max(-1) - zero.astype(np.float32)) / top).astype(np.float16)
    s = step.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint((grouped - z) / np.where(s > 0, s, 1)), 0)
    symbols = np.clip(q, 0, top).astype(np.uint8).reshape(rows, dim)
    return ValueCode(symbols, zero, step)


def quantize_values_uniform(values: np.ndarray, value_step: float, group: int) -> ValueCode:
    """values (rows, head_dim) float32 → symbols round(v / step) + 128, step = value_step × RMS of each (row, group)
    (at least max|v| / 127, so no symbol is clipped): error at most step/2 per element."""
    rows, dim = values.shape
    grouped = values.reshape(rows, dim // group, group).astype(np.float64)
    rms = np.sqrt(np.mean(grouped**2, axis=-1))
    least = np.abs(grouped).max(-1) / (KEY_CENTRE - 1)
    step = np.maximum(value_step * rms, least).astype(np.float16)
    # float16 rounding may have shrunk the step below the no-clipping bound: move up one representable value.
    step = np.where(step.astype(np.float64) < least, np.nextafter(step, np.float16(np.inf)), step)
    s = step.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(grouped / np.where(s > 0, s, 1)), 0) + KEY_CENTRE
    symbols = np.clip(q, 0, KEY_LEVELS - 1).astype(np.uint8).reshape(rows, dim)
    return ValueCode(symbols, np.zeros((0, dim // group), np.float16), step)


def dequantize_values(code: ValueCode) -> np.ndarray:
    """symbol × step + zero per (row, group); without zero points (uniform), zero = -128 × step."""
    rows, dim = code.symbols.shape
    groups = code.step.shape[1]
    step = code.step.astype(np.float32)[..., None]
    zero = -KEY_CENTRE * step if code.zero.shape[0] == 0 else code.zero.astype(np.float32)[..., None]
    grouped = code.symbols.reshape(rows, groups, dim // groups).astype(np.float32)
    return (grouped * step + zero).reshape(rows, dim)
