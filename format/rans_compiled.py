"""The rANS decoder's step loop compiled with numba, when it is installed (`pip install 'kvc-format[fast]'`; it has
wheels for Linux x86_64 and aarch64 and macOS arm64, so no compiler is needed). Without it `rans` runs its numpy
loop, which decodes the same symbols and raises the same errors.

Within an item (one payload, its own words), one lane at a time per step, lanes in index order: exactly the order
in which the numpy loop hands an item's words to the lanes that renormalise (step ascending, then lane ascending),
so the symbols are bit-identical; items share nothing, so they decode on their own, in parallel. All arithmetic is
in int64 (states < 2**32, products < 2**36): numba would turn mixed unsigned and signed operands into floats.
"""

import numpy as np
from numba import njit, prange

OK, TRUNCATED, BAD_FINAL_STATE = 0, 1, 2


@njit(cache=True, nogil=True, parallel=True)
def symbol_tables(freq, prob_bits, bucket_bits):  # pragma: no cover - compiled
    """Validated tables (T, A), each summing to 2**prob_bits → (cum, start, first, bucket) for `decode_item`.

    Each table keeps only its symbols from the first to the last of non-zero frequency (quantized symbols cluster,
    e.g. 8 values around 128 at 3 bits): cum[start[r] + j] is the cumulative frequency of symbol first[r] + j, and
    one more entry holds 2**prob_bits. bucket[r · B + b], B = 2**(prob_bits − bucket_bits), is the largest j whose
    cumulative frequency is at or below slot b · 2**bucket_bits: the first candidate for every slot of the bucket."""
    n_tables, alphabet = freq.shape
    first = np.empty(n_tables, np.int64)
    width = np.empty(n_tables, np.int64)
    for r in prange(n_tables):
        low = 0
        while freq[r, low] == 0:
            low += 1
        high = alphabet - 1
        while freq[r, high] == 0:
            high -= 1
        first[r] = low
        width[r] = high - low + 2
    start = np.empty(n_tables, np.int64)
    total = 0
    for r in range(n_tables):
        start[r] = total
        total += width[r]
    cum = np.empty(total, np.int64)
    buckets = 1 << (prob_bits - bucket_bits)
    bucket = np.empty(n_tables * buckets, np.uint8)
    for r in prange(n_tables):
        base, low, c = start[r], first[r], 0
        for j in range(width[r] - 1):
            cum[base + j] = c
            c += freq[r, low + j]
        cum[base + width[r] - 1] = c
        j = 0
        for b in range(buckets):
            while cum[base + j + 1] <= b << bucket_bits:
                j += 1
            bucket[r * buckets + b] = j
    return cum, start, first, bucket


@njit(cache=True, nogil=True, parallel=True)
def decode_items(out, states, words, lengths, tables, starts, item_lane_start, item_lane_end, item_ptr, item_end,
                 cum, cum_start, first, bucket, bucket_bits, prob_bits, low, word_bits, results):  # pragma: no cover
    """Decode every item (an independent payload: its own lanes and words) on its own, items in parallel: one
    item's few hundred lanes keep their states in cache through all its steps. results[k] = (status, lane, step,
    state) of item k, as `decode_item` returns them."""
    for k in prange(item_lane_start.size):
        status, lane, step, state = decode_item(out, states, words, lengths, tables, starts, item_lane_start[k],
                                                item_lane_end[k], item_ptr, item_end, k, cum, cum_start, first,
                                                bucket, bucket_bits, prob_bits, low, word_bits)
        results[k, 0] = status
        results[k, 1] = lane
        results[k, 2] = step
        results[k, 3] = state


@njit(cache=True, nogil=True)
def decode_item(out, states, words, lengths, tables, starts, lane_start, lane_end, item_ptr, item_end, item, cum,
                cum_start, first, bucket, bucket_bits, prob_bits, low, word_bits):  # pragma: no cover - compiled
    """Fill `out` from lanes lane_start … lane_end − 1 of `item`, whose words are words[item_ptr[item] :
    item_end[item]] (item_ptr is advanced past those read; `words` holds at least one element). Tables as
    `symbol_tables` lays them out: a slot's symbol starts from its bucket's and steps on while the next cumulative
    frequency is still at or below the slot.

    Steps run in phases up to the next step at which some lane ends, so the inner loop neither checks lengths nor
    moves lanes; a lane's word is read without a branch (the read is kept only where the lane renormalises).

    Returns (status, lane, step, state): TRUNCATED when a lane needs a word the item no longer has,
    BAD_FINAL_STATE when a lane ends at a state other than `low` (the first such lane of the step, once the whole
    step has read its words), else OK."""
    slot_mask = (1 << prob_bits) - 1
    buckets = 1 << (prob_bits - bucket_bits)
    last_word = words.size - 1
    n = lane_end - lane_start
    lane = np.empty(n, np.int64)  # per active lane, in index order: its lane number, state, length, …
    x = np.empty(n, np.int64)
    length = np.empty(n, np.int64)
    base = np.empty(n, np.int64)  # where its table's cumulative frequencies start
    lookup = np.empty(n, np.int64)  # where its table's buckets start
    symbol0 = np.empty(n, np.int64)  # its table's first symbol
    at = np.empty(n, np.int64)  # where its symbols go in `out`
    m = 0
    for i in range(lane_start, lane_end):
        if lengths[i] > 0:
            row = tables[i]
            lane[m], x[m], length[m] = i, states[i], lengths[i]
            base[m], lookup[m], symbol0[m], at[m] = cum_start[row], row * buckets, first[row], starts[i]
            m += 1
    p, end = item_ptr[item], item_end[item]
    t = 0
    while m > 0:
        stop = length[0]
        for j in range(1, m):
            stop = min(stop, length[j])
        while t < stop:
            for j in range(m):
                xj = x[j]
                slot = xj & slot_mask
                b = base[j]
                k = np.int64(bucket[lookup[j] + (slot >> bucket_bits)])
                while cum[b + k + 1] <= slot:
                    k += 1
                c = cum[b + k]
                out[at[j] + t] = symbol0[j] + k
                xj = (cum[b + k + 1] - c) * (xj >> prob_bits) + slot - c
                need = np.int64(xj < low)
                if need & np.int64(p >= end):
                    item_ptr[item] = p
                    return TRUNCATED, lane[j], t, 0
                xj = (xj << (word_bits * need)) | (np.int64(words[min(p, last_word)]) & -need)
                p += need
                x[j] = xj
            t += 1
        keep = 0
        for j in range(m):
            if length[j] == stop:
                if x[j] != low:
                    item_ptr[item] = p
                    return BAD_FINAL_STATE, lane[j], stop - 1, x[j]
            else:
                lane[keep], x[keep], length[keep] = lane[j], x[j], length[j]
                base[keep], lookup[keep], symbol0[keep], at[keep] = base[j], lookup[j], symbol0[j], at[j]
                keep += 1
        m = keep
    item_ptr[item] = p
    return OK, -1, t, 0
