"""The rANS decoder's step loop compiled with numba, when it is installed (`pip install 'kvc-format[fast]'`; it has
wheels for Linux x86_64 and aarch64 and macOS arm64, so no compiler is needed). Without it `rans` runs its numpy
loop, which decodes the same symbols and raises the same errors.

One lane at a time per step, lanes in index order: exactly the order in which the numpy loop hands words to the
lanes that renormalise (step ascending, then lane ascending, each item's words in turn), so the symbols are
bit-identical. All arithmetic is in int64 (states < 2**32, products < 2**36): numba would turn mixed unsigned and
signed operands into floats.
"""

import numpy as np
from numba import njit

OK, TRUNCATED, BAD_FINAL_STATE = 0, 1, 2


@njit(cache=True, nogil=True)
def decode_steps(out, states, words, lengths, tables, starts, lane_item, item_ptr, item_end, cum, cum_start, first,
                 bucket, bucket_bits, prob_bits, low, word_bits):  # pragma: no cover - compiled
    """Fill `out` from every lane; `item_ptr` advances past the words read. Tables as `rans._compact_cumulative`
    lays them out: a slot's symbol starts from its bucket's and steps on while the next cumulative frequency is
    still at or below the slot.

    Returns (status, lane, step, state): TRUNCATED when a lane needs a word its item no longer has,
    BAD_FINAL_STATE when a lane ends at a state other than `low` (the first such lane of the step, once the whole
    step has read its words), else OK."""
    slot_mask = (1 << prob_bits) - 1
    buckets = 1 << (prob_bits - bucket_bits)
    active = np.empty(lengths.size, np.int64)
    m = 0
    for i in range(lengths.size):
        if lengths[i] > 0:
            active[m] = i
            m += 1
    x = states.copy()
    t = 0
    while m > 0:
        bad_lane, bad_state, keep = -1, 0, 0
        for j in range(m):
            i = active[j]
            xi = x[i]
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
                item = lane_item[i]
                p = item_ptr[item]
                if p >= item_end[item]:
                    return TRUNCATED, i, t, 0
                xi = (xi << word_bits) | words[p]
                item_ptr[item] = p + 1
            x[i] = xi
            if lengths[i] == t + 1:
                if xi != low and bad_lane < 0:
                    bad_lane, bad_state = i, xi
            else:
                active[keep] = i
                keep += 1
        if bad_lane >= 0:
            return BAD_FINAL_STATE, bad_lane, t, bad_state
        m = keep
        t += 1
    return OK, -1, t, 0
