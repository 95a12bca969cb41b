"""rANS decoding on the GPU: the interleaved static rANS of SPEC.md §5 (kvc_format.rans), one Triton program per
payload ("item").

Within an item, the lanes read their renormalisation words from one shared sequence, in step order then lane order,
so step t of every lane must finish before step t + 1 of any lane can know where its next word lies. A program
therefore walks the steps in order and, at each step, gives the lanes that need a word consecutive words with an
exclusive prefix sum over the lanes (`tl.cumsum`). Items are independent and run as parallel programs.
"""

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from kvc_format.errors import CodecError
from kvc_format.rans import PROB_BITS, PROB_SCALE, STATE_LOW, LaneBatch

from . import to_device

LANES_PER_PASS = 1024  # lanes a program advances per pass within a step (more lanes take several passes)


@triton.jit
def _decode_items(
    states_ptr, words_ptr, lane_len_ptr, lane_table_ptr, lane_out_ptr,
    item_lane_ptr, item_lanes_ptr, item_word_ptr, item_words_ptr, item_steps_ptr, item_stride_ptr,
    lookup_ptr, freq_ptr, cum_ptr, out_ptr, status_ptr,
    ALPHABET: tl.constexpr, PROB: tl.constexpr, LOW: tl.constexpr, BLOCK: tl.constexpr,
):
    item = tl.program_id(0)
    lane0 = tl.load(item_lane_ptr + item)
    n_lanes = tl.load(item_lanes_ptr + item)
    word0 = tl.load(item_word_ptr + item)
    n_words = tl.load(item_words_ptr + item)
    steps = tl.load(item_steps_ptr + item)
    stride = tl.load(item_stride_ptr + item)
    ptr = item * 0  # words this item has consumed so far
    bad = item * 0  # lanes whose final state is not LOW
    short = item * 0  # lanes that asked for a word past the item's end
    for t in range(0, steps):
        for first in range(0, n_lanes, BLOCK):
            lanes = first + tl.arange(0, BLOCK)
            length = tl.load(lane_len_ptr + lane0 + lanes, mask=lanes < n_lanes, other=0)
            active = t < length
            x = tl.load(states_ptr + lane0 + lanes, mask=active, other=LOW).to(tl.uint32, bitcast=True)
            table = tl.load(lane_table_ptr + lane0 + lanes, mask=active, other=0).to(tl.int64)
            slot = x & ((1 << PROB) - 1)
            symbol = tl.load(lookup_ptr + (table << PROB) + slot.to(tl.int64), mask=active, other=0).to(tl.int64)
            f = tl.load(freq_ptr + table * ALPHABET + symbol, mask=active, other=1).to(tl.uint32)
            c = tl.load(cum_ptr + table * ALPHABET + symbol, mask=active, other=0).to(tl.uint32)
            x = f * (x >> PROB) + slot - c
            need = (active & (x < LOW)).to(tl.int32)
            at = ptr + tl.cumsum(need, axis=0) - need
            inside = (need > 0) & (at < n_words)
            short += tl.sum(((need > 0) & (at >= n_words)).to(tl.int32), axis=0)
            word = tl.load(words_ptr + word0 + at, mask=inside, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
            x = tl.where(need > 0, (x << 16) | word, x)
            ptr += tl.sum(need, axis=0)
            out = tl.load(lane_out_ptr + lane0 + lanes, mask=active, other=0)
            tl.store(out_ptr + out + t * stride, symbol.to(tl.uint8), mask=active)
            bad += tl.sum((active & (t == length - 1) & (x != LOW)).to(tl.int32), axis=0)
            tl.store(states_ptr + lane0 + lanes, x.to(tl.int32, bitcast=True), mask=active)
    tl.store(status_ptr + item * 3, ptr)
    tl.store(status_ptr + item * 3 + 1, bad)
    tl.store(status_ptr + item * 3 + 2, short)


class DecodeStatus(NamedTuple):
    """Per-item outcome, on the device until `check` reads it."""

    status: torch.Tensor  # (items, 3) int32: words consumed, lanes ending off L, word reads past the end
    item_words: np.ndarray

    def check(self) -> None:
        """CodecError for the first corrupt item, as kvc_format's decoder would raise."""
        status = self.status.cpu().numpy()
        for k, (used, bad, short) in enumerate(status.tolist()):
            where = f"item {k}: " if len(status) > 1 else ""
            if short:
                raise CodecError(f"{where}payload is truncated")
            if bad:
                raise CodecError(f"{where}{bad} lanes end off state {STATE_LOW}: the payload is corrupt")
            if used != self.item_words[k]:
                raise CodecError(f"{where}{int(self.item_words[k]) - used} words are left over after the last symbol")


def decode(batch: LaneBatch, lane_out: np.ndarray, item_stride: np.ndarray, out: torch.Tensor) -> DecodeStatus:
    """Decode a checked batch (kvc_format.rans.prepare_batch) into `out` (uint8, on the device): lane i's t-th symbol
    goes to out[lane_out[i] + t * item_stride[item of lane i]]. Asynchronous on CUDA; `check()` the result."""
    device = out.device
    n_items = batch.item_words.size
    item_lanes = batch.item_lanes
    item_lane = np.cumsum(item_lanes) - item_lanes
    item_steps = np.zeros(n_items, np.int64)
    if batch.lengths.size:
        np.maximum.at(item_steps, batch.lane_item, batch.lengths)
    n_tables, alphabet = batch.freq.shape

    def put(array: np.ndarray, dtype) -> torch.Tensor:
        return to_device(array, device, dtype)

    freq = put(batch.freq, np.int32)
    cum = torch.cumsum(freq, dim=1, dtype=torch.int32) - freq
    symbols = torch.arange(alphabet, device=device, dtype=torch.uint8).repeat(n_tables)
    lookup = torch.repeat_interleave(symbols, freq.reshape(-1).to(torch.int64), output_size=n_tables * PROB_SCALE)
    status = torch.zeros((n_items, 3), dtype=torch.int32, device=device)
    if n_items:
        _decode_items[(n_items,)](
            put(batch.states.astype(np.uint32).view(np.int32), np.int32),
            put(batch.words.view(np.int16), np.int16),
            put(batch.lengths, np.int32), put(batch.tables, np.int32), put(lane_out, np.int64),
            put(item_lane, np.int64), put(item_lanes, np.int32), put(np.cumsum(batch.item_words) - batch.item_words,
                                                                     np.int64),
            put(batch.item_words, np.int32), put(item_steps, np.int32), put(item_stride, np.int32),
            lookup, freq, cum, out, status,
            ALPHABET=alphabet, PROB=PROB_BITS, LOW=STATE_LOW, BLOCK=_block(int(item_lanes.max())),
        )
    return DecodeStatus(status, batch.item_words)


def _block(lanes: int) -> int:
    """Lanes per pass: a power of two covering the largest item, within [16, LANES_PER_PASS]."""
    return min(LANES_PER_PASS, triton.next_power_of_2(max(lanes, 16)))
