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
    """Fill `out` from lanes lane_start … lane_end − 1 of `item`, whose words start at item_ptr[item] (advanced
    past those read). Tables as `rans._compact_cumulative` lays them out: a slot's symbol starts from its bucket's
    and steps on while the next cumulative frequency is still at or below the slot.

    Returns (status, lane, step, state): TRUNCATED when a lane needs a word the item no longer has,
    BAD_FINAL_STATE when a lane ends at a state other than `low` (the first such lane of the step, once the whole
    step has read its words), else OK."""
    slot_mask = (1 << prob_bits) - 1
    buckets = 1 << (prob_bits - bucket_bits)
    active = np.empty(lane_end - lane_start, np.int64)
    x = np.empty(lane_end - lane_start, np.int64)
    m = 0
    for i in range(lane_start, lane_end):
        if lengths[i] > 0:
            active[m] = i
            x[m] = states[i]
            m += 1
    p, end = item_ptr[item], item_end[item]
    t = 0
    while m > 0:
        bad_lane, bad_state, keep = -1, 0, 0
        for j in range(m):
            i = active[j]
            xi = x[j]
            slot = xi & slot_mask
            row = tables[i]
            base = cum_start[row]
            k = np.int64(bucket[row * buckets + (slot >> bucket_bits)])
            while cum[base + k + 1] <= slot:
                k += 1
            start = cum[base + k]
            out[starts[i] + t] = first[row] + k
            xi = (cum[base + k + 1] - start) * (xi >> prob_bits) + slot - start
            if xi < low:
                if p >= end:
                    item_ptr[item] = p
                    return TRUNCATED, i, t, 0
                xi = (xi << word_bits) | words[p]
                p += 1
            if lengths[i] == t + 1:
                if xi != low and bad_lane < 0:
                    bad_lane, bad_state = i, xi
            else:
                active[keep] = i
                x[keep] = xi
                keep += 1
        if bad_lane >= 0:
            item_ptr[item] = p
            return BAD_FINAL_STATE, bad_lane, t, bad_state
        m = keep
        t += 1
    item_ptr[item] = p
    return OK, -1, t, 0
