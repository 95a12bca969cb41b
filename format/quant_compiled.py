"""A quantized layer's dequantization compiled with numba, when it is installed (see `rans_compiled`): the lane
order of the rANS output undone, keys and values dequantized and written to their rows, and non-finite results
counted, in one pass over the symbols and rows in parallel. Without numba `quantized.decode_layer` does the same in
numpy; both round every product and every sum to float32 in the same order, so their floats are identical.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def dequantize_rows(key_symbols, value_symbols, key_lanes, value_lanes, row_head, head_start, rows_q, key_zero,
                    key_step, value_zero, value_step, out_rows, row_positions, cos, sin, keys,
                    values):  # pragma: no cover - compiled
    """Write quantized row j (of the layer's quantized rows, head by head) to row out_rows[j] of keys and values.

    key_symbols / value_symbols: 1-D uint8, in lane order (each head's block column by column) where key_lanes /
    value_lanes, else row by row. row_head[j]: the row's head; head_start[h]: the head's first quantized row.
    key_zero, key_step (kv_heads, head_dim) and value_zero, value_step (rows, groups) float32. Returns how many
    rows hold a value that is not finite."""
    dim = keys.shape[1]
    groups = value_step.shape[1]
    group = dim // groups
    largest = np.float32(np.finfo(np.float32).max)
    bad = 0
    for j in prange(row_head.size):
        h = row_head[j]
        n = rows_q[h]
        lane_at = head_start[h] * dim + j - head_start[h]  # column c of this row is at lane_at + c · n
        k_at, k_stride = (lane_at, n) if key_lanes else (j * dim, 1)
        v_at, v_stride = (lane_at, n) if value_lanes else (j * dim, 1)
        o = out_rows[j]
        finite = True
        for c in range(dim):
            k = np.float32(key_symbols[k_at + c * k_stride]) * key_step[h, c] + key_zero[h, c]
            keys[o, c] = k
        if cos.shape[1]:
            at = row_positions[j]
            for c in range(cos.shape[1]):
                a, b = keys[o, c], keys[o, c + cos.shape[1]]
                keys[o, c] = a * cos[at, c] - b * sin[at, c]
                keys[o, c + cos.shape[1]] = b * cos[at, c] + a * sin[at, c]
        for c in range(dim):
            finite &= abs(keys[o, c]) <= largest  # false for infinities and NaN
        for g in range(groups):
            step, zero = value_step[j, g], value_zero[j, g]
            for c in range(g * group, (g + 1) * group):
                v = np.float32(value_symbols[v_at + c * v_stride]) * step + zero
                values[o, c] = v
                finite &= abs(v) <= largest
        if not finite:
            bad += 1
    return bad
