"""Dequantization on the GPU (SPEC.md §4.3): symbol × step + zero point, written straight to each quantized row's
place among a layer's kept rows. The same arithmetic as kvc_format.scalar_quantizers, in float32."""

import torch
import triton
import triton.language as tl

from kvc_format.scalar_quantizers import KEY_CENTRE

ELEMENTS_PER_PROGRAM = 1024


@triton.jit
def _dequantize(
    symbols_ptr, step_ptr, zero_ptr, row_head_ptr, dst_row_ptr, out_ptr, n, dim, group, groups,
    PER_TOKEN: tl.constexpr, HAS_ZERO: tl.constexpr, CENTRE: tl.constexpr, BLOCK: tl.constexpr,
):
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = at < n
    row = at // dim
    channel = at % dim
    if PER_TOKEN:  # values: one step (and zero point) per (row, group of channels)
        param = row * groups + channel // group
    else:  # keys: one step and zero point per (head, channel)
        param = tl.load(row_head_ptr + row, mask=inside, other=0).to(tl.int64) * dim + channel
    step = tl.load(step_ptr + param, mask=inside, other=0.0).to(tl.float32)
    if HAS_ZERO:  # noqa: SIM108 (a compile-time branch; Triton's ternary support varies)
        zero = tl.load(zero_ptr + param, mask=inside, other=0.0).to(tl.float32)
    else:
        zero = -CENTRE * step
    value = tl.load(symbols_ptr + at, mask=inside, other=0).to(tl.float32) * step + zero
    dst = tl.load(dst_row_ptr + row, mask=inside, other=0) * dim + channel
    tl.store(out_ptr + dst, value, mask=inside)


def dequantize_keys(symbols: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, row_head: torch.Tensor,
                    dst_rows: torch.Tensor, out: torch.Tensor) -> None:
    """symbols (rows, dim) uint8, step/zero (kv_heads, dim) float32, row_head (rows,) int32 → out[dst_rows]."""
    _launch(symbols, step, zero, row_head, dst_rows, out, symbols.shape[1], 1, False, True)


def dequantize_values(symbols: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None, dst_rows: torch.Tensor,
                      out: torch.Tensor) -> None:
    """symbols (rows, dim) uint8, step (rows, groups) float16, zero the same or None (uniform: −128 × step)
    → out[dst_rows] (kept, dim) float32."""
    groups = step.shape[1]
    _launch(symbols, step, zero, dst_rows, dst_rows, out, symbols.shape[1] // groups, groups, True, zero is not None)


def _launch(symbols, step, zero, row_head, dst_rows, out, group, groups, per_token, has_zero) -> None:
    n = symbols.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, ELEMENTS_PER_PROGRAM),)
    _dequantize[grid](symbols, step, step if zero is None else zero, row_head, dst_rows, out, n, symbols.shape[1],
                      group, groups, PER_TOKEN=per_token, HAS_ZERO=has_zero, CENTRE=float(KEY_CENTRE),
                      BLOCK=ELEMENTS_PER_PROGRAM)
