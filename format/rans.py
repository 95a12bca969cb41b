"""Static-model interleaved rANS over many independent lanes, vectorised with numpy.

The model (normative: the format specification describes exactly this):

* `PROB_BITS = 12`, M = `PROB_SCALE` = 4096, state lower bound L = `STATE_LOW` = 2**16; states are unsigned
  32-bit values in [L, 2**32) and the renormalisation unit is one 16-bit word.
* A table is a uint16 vector `freq` of length A (2 <= A <= 256) summing to exactly M, with `cum[s] = sum(freq[:s])`.
  Only symbols with `freq[s] >= 1` can be coded.
* The N uint8 symbols are cut into lanes by `lane_lengths` (lane i holds the next `lane_lengths[i]` symbols) and lane
  i is coded with table `lane_tables[i]`. Every lane has its own state.
* Encoding a lane: x = L; for t = n-1 down to 0, with f, c the frequency and cumulative frequency of symbol t: if
  x >= f << 20 the lane emits word (x & 0xFFFF) at step t and x >>= 16; then x = ((x // f) << 12) + x % f + c.
  The lane's final state is x.
* Decoding a lane: x = the stored final state; for t = 0 .. n-1: slot = x & (M-1), s is the symbol with
  cum[s] <= slot < cum[s] + freq[s], x = freq[s] * (x >> 12) + slot - cum[s], and if x < L the lane reads the next
  word at step t: x = (x << 16) | word. After its last symbol a lane's state must be exactly L again.
* All words of all lanes form one sequence ordered by step ascending, then by lane index ascending: the word a lane
  emits at encode step t is the word it reads at decode step t.
* Payload: the final states (uint32 little-endian, one per lane) followed by the word sequence (uint16
  little-endian). Nothing else: the caller knows the lane layout and the tables.

Encoding is a Python loop over steps (the longest lane) with numpy operations over all active lanes. Decoding runs
the same loop, or, where numba is installed, a compiled loop over steps and lanes (`rans_compiled`) that gives
bit-identical symbols and the same errors.
"""

import functools
import importlib
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .errors import CodecError

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = 1 << 16
WORD_BITS = 16
MAX_ALPHABET = 256

_SLOT_MASK = PROB_SCALE - 1
_EMIT_SHIFT = 32 - PROB_BITS
# The decoder's slot -> symbol lookup holds one byte per bucket of 2**shift slots per table; the shift grows until
# the lookup fits in this many bytes (it never holds more than one byte per slot, nor fewer than one per table).
# About the size of a core's L2 cache: a larger, exact lookup measured slower for thousands of tables.
_LOOKUP_BUDGET = 1 << 21
_INT64_MAX = np.iinfo(np.int64).max
BUCKET_BITS = 4  # the compiled decoder finds a slot's symbol from its bucket of 16 slots, rarely a step further

DecodeItem = tuple[bytes | memoryview, np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------------- tables


def validate_tables(freq: np.ndarray, alphabet: int) -> None:
    """Check `freq` is a (T, alphabet) uint16 array whose rows each sum to M; raise CodecError if not."""
    if not isinstance(alphabet, int | np.integer) or not 2 <= int(alphabet) <= MAX_ALPHABET:
        raise CodecError(f"alphabet size {alphabet!r} is not in [2, {MAX_ALPHABET}]")
    if not isinstance(freq, np.ndarray):
        raise CodecError(f"frequency tables must be a numpy array, not {type(freq).__name__}")
    if freq.dtype != np.uint16:
        raise CodecError(f"frequency tables must be uint16, not {freq.dtype}")
    if freq.ndim != 2 or freq.shape[1] != int(alphabet):
        raise CodecError(f"frequency tables have shape {freq.shape}, expected (T, {int(alphabet)})")
    if freq.shape[0]:
        sums = freq.sum(axis=1, dtype=np.int64)
        bad = np.flatnonzero(sums != PROB_SCALE)
        if bad.size:
            t = int(bad[0])
            raise CodecError(f"frequency table {t} sums to {int(sums[t])}, not {PROB_SCALE}")


def _tables(freq: np.ndarray) -> np.ndarray:
    """Validate tables whose alphabet is their second dimension."""
    if not isinstance(freq, np.ndarray) or freq.ndim != 2:
        shape = getattr(freq, "shape", None)
        raise CodecError(f"frequency tables must be a 2-D (T, A) array, got shape {shape}")
    validate_tables(freq, freq.shape[1])
    return freq


def quantize_frequencies(counts: np.ndarray) -> np.ndarray:
    """Frequency tables (T, A) uint16 from symbol counts (T, A): each row sums to M, and an entry is >= 1 exactly
    where its count is > 0 (0 elsewhere). An all-zero row gets all its mass on symbol 0.

    Entries are floor(count * M / total), raised to 1 where that is 0; a row still short of M gets +1 on its largest
    remainders, a row over M (because of the raises) gives back in proportion to freq - 1 (largest remainders first),
    so large entries shrink by the same relative amount and no used entry falls below 1.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.dtype.kind not in "iu":
        raise ValueError(f"counts must be a 2-D integer array, got {counts.dtype} with shape {counts.shape}")
    alphabet = counts.shape[1]
    if not 2 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet size {alphabet} is not in [2, {MAX_ALPHABET}]")
    if counts.size and counts.min() < 0:
        raise ValueError("counts must be non-negative")
    if counts.dtype.kind == "u" and counts.size and counts.max() > _INT64_MAX:
        raise ValueError("counts too large")
    counts = counts.astype(np.int64)
    used = counts > 0
    # Keep count * M (and the row totals) far from int64 overflow: shift huge rows down, keeping used entries >= 1.
    if counts.size and counts.max() >= 1 << 40:
        shift = int(counts.max()).bit_length() - 40
        counts = np.where(used, np.maximum(counts >> shift, 1), 0)
    total = counts.sum(axis=1, keepdims=True)
    safe_total = np.maximum(total, 1)
    scaled = counts * PROB_SCALE
    freq = np.where(used, np.maximum(scaled // safe_total, 1), 0)
    remainder = scaled % safe_total
    deficit = PROB_SCALE - freq.sum(axis=1)  # > 0: short of M; < 0: over M because of the raises to 1

    columns = np.arange(alphabet)
    short = (deficit > 0) & (total[:, 0] > 0)
    if short.any():
        # Largest remainders first (ties: lower symbol first); raised entries (already above their share) last.
        key = np.where(used & (scaled >= safe_total), remainder, -1)[short]
        order = np.argsort(-key, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, columns[None, :], axis=1)
        freq[short] += rank < deficit[short, None]
    over = deficit < 0
    if over.any():
        excess = -deficit[over, None]
        spare = freq[over] - 1  # what each entry can give without dropping below 1 (unused: -1, masked below)
        spare = np.where(used[over], spare, 0)
        pool = spare.sum(axis=1, keepdims=True)  # >= M - A > excess, so every row can pay
        share = excess * spare
        take = share // pool
        left = excess[:, 0] - take.sum(axis=1)
        key = np.where(spare > 0, share % pool, -1)
        order = np.argsort(-key, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, columns[None, :], axis=1)
        freq[over] -= take + (rank < left[:, None])
    empty = total[:, 0] == 0
    freq[empty, 0] = PROB_SCALE
    return freq.astype(np.uint16)


def histograms(
    symbols: np.ndarray, lane_lengths: np.ndarray, lane_tables: np.ndarray, n_tables: int, alphabet: int
) -> np.ndarray:
    """Symbol counts per table, (n_tables, alphabet) int64, of symbols (N,) laid out in lanes as for `encode`."""
    symbols = _symbols(symbols, alphabet)
    lengths, tables = _layout(lane_lengths, lane_tables, n_tables)
    if int(lengths.sum()) != symbols.size:
        raise CodecError(f"lane lengths sum to {int(lengths.sum())} but {symbols.size} symbols are given")
    keys = np.repeat(tables * alphabet, lengths) + symbols
    return np.bincount(keys, minlength=n_tables * alphabet).reshape(n_tables, alphabet).astype(np.int64)


# --------------------------------------------------------------------------------------------------- checks


def _index_array(values: object, name: str) -> np.ndarray:
    """A 1-D int64 copy of an integer sequence (CodecError for anything else)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise CodecError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise CodecError(f"{name} must be integers, got {array.dtype}")
    if array.dtype.kind == "u" and array.max() > _INT64_MAX:
        raise CodecError(f"{name} holds a value too large")
    return array.astype(np.int64)


def _layout(lane_lengths: object, lane_tables: object, n_tables: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked (lengths, tables) int64 arrays of one lane layout."""
    lengths = _index_array(lane_lengths, "lane_lengths")
    tables = _index_array(lane_tables, "lane_tables")
    if lengths.shape != tables.shape:
        raise CodecError(f"{lengths.size} lane lengths but {tables.size} lane tables")
    if lengths.size:
        if lengths.min() < 0:
            raise CodecError(f"lane {int(np.argmin(lengths))} has negative length {int(lengths.min())}")
        if lengths.max() > _INT64_MAX // lengths.size:
            raise CodecError("lane lengths are too large")
        if tables.min() < 0 or tables.max() >= n_tables:
            lane = int(np.flatnonzero((tables < 0) | (tables >= n_tables))[0])
            raise CodecError(f"lane {lane} uses table {int(tables[lane])} of {n_tables}")
    return lengths, tables


def _symbols(symbols: object, alphabet: int) -> np.ndarray:
    """Symbols as a 1-D uint8 array; ValueError if one is outside [0, alphabet)."""
    symbols = np.asarray(symbols)
    if symbols.ndim != 1:
        raise ValueError(f"symbols must be 1-D, got shape {symbols.shape}")
    if symbols.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if symbols.dtype.kind not in "iu":
        raise ValueError(f"symbols must be integers, got {symbols.dtype}")
    if symbols.min() < 0 or symbols.max() >= alphabet:
        i = int(np.flatnonzero((symbols < 0) | (symbols >= alphabet))[0])
        raise ValueError(f"symbol {int(symbols[i])} at index {i} is outside the alphabet [0, {alphabet})")
    return symbols.astype(np.uint8, copy=False)


def _packed(freq: np.ndarray) -> np.ndarray:
    """(T * A,) uint64 entries freq | cum << 16, indexed by table * A + symbol."""
    freq64 = freq.astype(np.uint64)
    cum = np.cumsum(freq64, axis=1) - freq64
    return (freq64 | (cum << np.uint64(16))).reshape(-1)


# --------------------------------------------------------------------------------------------------- encode


def encode(symbols: np.ndarray, lane_lengths: np.ndarray, lane_tables: np.ndarray, freq: np.ndarray) -> bytes:
    """rANS payload of symbols (N,) uint8 in lanes `lane_lengths` (n_lanes,) coded with tables `freq` (T, A) uint16
    selected by `lane_tables` (n_lanes,). ValueError if a symbol is >= A or has frequency 0 in its lane's table."""
    freq = _tables(freq)
    n_tables, alphabet = freq.shape
    symbols = _symbols(symbols, alphabet)
    lengths, tables = _layout(lane_lengths, lane_tables, n_tables)
    n_lanes = lengths.size
    if int(lengths.sum()) != symbols.size:
        raise CodecError(f"lane lengths sum to {int(lengths.sum())} but {symbols.size} symbols are given")
    if symbols.size:
        sym_freq = freq.reshape(-1)[np.repeat(tables * alphabet, lengths) + symbols]
        zero = np.flatnonzero(sym_freq == 0)
        if zero.size:
            i = int(zero[0])
            raise ValueError(f"symbol {int(symbols[i])} at index {i} has frequency 0 in its lane's table")
    packed = _packed(freq)
    starts = np.cumsum(lengths) - lengths
    table_base = (tables * alphabet).astype(np.uint64)

    x_all = np.full(n_lanes, STATE_LOW, dtype=np.uint64)
    # Lanes join as t descends (lane i is active for t < lengths[i]); the active arrays stay in lane order.
    joining = np.argsort(lengths, kind="stable")[::-1]  # by length descending
    joining = joining[lengths[joining] > 0]
    join_lengths = lengths[joining]
    n_joined = 0
    active = np.zeros(0, dtype=np.int64)
    x = np.zeros(0, dtype=np.uint64)
    pos = np.zeros(0, dtype=np.int64)
    tbase = np.zeros(0, dtype=np.uint64)
    chunks: list[np.ndarray] = []
    steps = int(join_lengths[0]) if join_lengths.size else 0
    emit_shift = np.uint64(_EMIT_SHIFT)
    prob_bits = np.uint64(PROB_BITS)
    word_mask = np.uint64(0xFFFF)
    c_shift = np.uint64(16)
    for t in range(steps - 1, -1, -1):
        if n_joined < joining.size and join_lengths[n_joined] > t:
            end = n_joined + int(np.searchsorted(-join_lengths[n_joined:], -t, side="left"))
            new = np.sort(joining[n_joined:end])
            n_joined = end
            at = np.searchsorted(active, new)
            active = np.insert(active, at, new)
            x = np.insert(x, at, x_all[new])
            pos = np.insert(pos, at, starts[new] + t)
            tbase = np.insert(tbase, at, table_base[new])
        fc = packed[tbase + symbols[pos]]
        f = fc & word_mask
        c = fc >> c_shift
        emit = np.flatnonzero(x >= (f << emit_shift))
        if emit.size:
            chunks.append((x[emit] & word_mask).astype("<u2"))
            x[emit] >>= np.uint64(WORD_BITS)
        q, r = np.divmod(x, f)
        x = (q << prob_bits) + r + c
        pos -= 1
    x_all[active] = x
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, dtype="<u2")
    return x_all.astype("<u4").tobytes() + words.tobytes()


# --------------------------------------------------------------------------------------------------- decode


def decode(
    payload: bytes | memoryview, lane_lengths: np.ndarray, lane_tables: np.ndarray, freq: np.ndarray
) -> np.ndarray:
    """Symbols (N,) uint8, N = sum(lane_lengths), of a payload written by `encode` with the same lane layout and
    tables (T, A). CodecError if the payload is malformed, truncated, too long or corrupt."""
    return decode_many([(payload, lane_lengths, lane_tables, freq)])[0]


class LaneBatch(NamedTuple):
    """Checked, concatenated lanes of several payloads, ready for a decoder (this module's step loop, or a GPU
    kernel that implements the same model). Lanes are numbered over all items, item by item."""

    states: np.ndarray  # (lanes,) uint64: stored final states, all >= L; empty lanes hold exactly L
    words: np.ndarray  # (W,) uint16: every item's words, item after item
    lengths: np.ndarray  # (lanes,) int64: symbols per lane
    tables: np.ndarray  # (lanes,) int64: row of `freq` each lane uses
    freq: np.ndarray  # (T, A) uint16: all items' tables, narrower alphabets padded with zero-frequency symbols
    lane_item: np.ndarray  # (lanes,) int64: the item each lane belongs to
    item_lanes: np.ndarray  # (items,) int64: lanes each item has
    item_words: np.ndarray  # (items,) int64: words each item owns
    item_symbols: np.ndarray  # (items,) int64: symbols each item decodes to

    def lane_error(self, lane: int, message: str) -> CodecError:
        """An error about global lane `lane`, named by its item and its index within the item."""
        k = int(self.lane_item[lane])
        local = lane - int(np.searchsorted(self.lane_item, k))
        return CodecError(f"item {k}: lane {local}: {message}" if self.item_words.size > 1 else
                          f"lane {local}: {message}")


def prepare_batch(items: Sequence[DecodeItem]) -> LaneBatch:
    """Validate items (payload, lane_lengths, lane_tables, freq), as for `decode`, and concatenate their lanes.
    CodecError for malformed tables, layouts, payload sizes or stored states."""
    items = list(items)
    n_items = len(items)
    lane_len: list[np.ndarray] = []
    lane_tab: list[np.ndarray] = []
    lane_state: list[np.ndarray] = []
    word_parts: list[np.ndarray] = []
    table_parts: list[np.ndarray] = []
    item_lanes = np.zeros(n_items, dtype=np.int64)
    item_words = np.zeros(n_items, dtype=np.int64)
    item_symbols = np.zeros(n_items, dtype=np.int64)
    n_tables = 0
    alphabet = 2
    for k, item in enumerate(items):
        if not isinstance(item, tuple | list) or len(item) != 4:
            raise CodecError(f"item {k}: expected (payload, lane_lengths, lane_tables, freq)")
        payload, lane_lengths, lane_tables, freq = item
        where = f"item {k}: " if n_items > 1 else ""
        try:
            freq = _tables(freq)
            lengths, tables = _layout(lane_lengths, lane_tables, freq.shape[0])
            states, words = _split_payload(payload, lengths.size)
        except CodecError as error:
            raise CodecError(f"{where}{error}") from None
        low = np.flatnonzero(states < STATE_LOW)
        if low.size:
            lane = int(low[0])
            raise CodecError(f"{where}lane {lane}: stored state {int(states[lane])} is below {STATE_LOW}")
        lane_len.append(lengths)
        lane_tab.append(tables + n_tables)
        lane_state.append(states)
        word_parts.append(words)
        table_parts.append(freq)
        item_lanes[k] = lengths.size
        item_words[k] = words.size
        item_symbols[k] = int(lengths.sum())
        n_tables += freq.shape[0]
        alphabet = max(alphabet, freq.shape[1])
    lengths = np.concatenate(lane_len) if lane_len else np.zeros(0, dtype=np.int64)
    if lengths.size and lengths.max() > _INT64_MAX // lengths.size:
        raise CodecError("lane lengths are too large")
    freq = np.zeros((n_tables, alphabet), dtype=np.uint16)
    row = 0
    for part in table_parts:
        freq[row : row + part.shape[0], : part.shape[1]] = part
        row += part.shape[0]
    batch = LaneBatch(
        states=np.concatenate(lane_state).astype(np.uint64) if lane_state else np.zeros(0, dtype=np.uint64),
        words=np.concatenate(word_parts) if word_parts else np.zeros(0, dtype="<u2"),
        lengths=lengths,
        tables=np.concatenate(lane_tab) if lane_tab else np.zeros(0, dtype=np.int64),
        freq=freq,
        lane_item=np.repeat(np.arange(n_items), item_lanes),
        item_lanes=item_lanes,
        item_words=item_words,
        item_symbols=item_symbols,
    )
    idle = np.flatnonzero((batch.lengths == 0) & (batch.states != STATE_LOW))
    if idle.size:
        lane = int(idle[0])
        raise batch.lane_error(lane, f"empty lane stores state {int(batch.states[lane])}, not {STATE_LOW}")
    return batch


def decode_many(items: Sequence[DecodeItem]) -> list[np.ndarray]:
    """Decode several independent payloads, each (payload, lane_lengths, lane_tables, freq) as for `decode`, in one
    vectorised step loop. Returns one (N_i,) uint8 array per item (views into one shared buffer)."""
    if not items:
        return []
    batch = prepare_batch(items)
    out = np.empty(int(batch.item_symbols.sum()), dtype=np.uint8)
    _decode_lanes(out, batch)
    bounds = np.cumsum(batch.item_symbols)
    return [out[b - n : b] for b, n in zip(bounds.tolist(), batch.item_symbols.tolist(), strict=True)]


def _split_payload(payload: bytes | memoryview, n_lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """(states uint32 (n_lanes,), words uint16 (W,)) of one payload."""
    try:
        data = np.frombuffer(payload, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as error:
        raise CodecError(f"payload is not a contiguous byte buffer: {error}") from None
    head = 4 * n_lanes
    if data.size < head:
        raise CodecError(f"payload of {data.size} bytes is shorter than the {head} bytes of {n_lanes} lane states")
    if (data.size - head) % 2:
        raise CodecError(f"payload of {data.size} bytes leaves an odd {data.size - head} bytes after the lane states")
    states = data[:head].view("<u4")
    words = data[head:].view("<u2")
    return states, words


def decoder() -> str:
    """How symbols decode: "compiled" (numba, when installed: the rANS step loop here and the dequantizer of
    `quantized`) or "numpy"; $KVC_RANS_DECODER forces one."""
    wanted = os.environ.get("KVC_RANS_DECODER", "auto")
    if wanted not in ("auto", "compiled", "numpy"):
        raise CodecError(f"KVC_RANS_DECODER={wanted!r}: use auto, compiled or numpy")
    if wanted == "numpy":
        return "numpy"
    if _compiled() is None:
        if wanted == "compiled":
            raise CodecError("KVC_RANS_DECODER=compiled needs numba: pip install 'kvc-format[fast]'")
        return "numpy"
    return "compiled"


def warm_up() -> str:
    """Import and load the compiled step loop now (about 0.3 s once per process: numba's import, then its cached
    machine code, compiled on the first use ever), so that a timed decode later does not pay it. Returns
    `decoder()`."""
    chosen = decoder()
    if chosen == "compiled":
        symbols = np.zeros(4, dtype=np.uint8)
        freq = np.array([[PROB_SCALE - 1, 1]], dtype=np.uint16)
        lanes, tables = np.array([symbols.size]), np.array([0])
        decode(encode(symbols, lanes, tables, freq), lanes, tables, freq)
    return chosen


@functools.cache
def _compiled(name: str = "rans_compiled"):
    """kvc_format's module `name` of compiled kernels (rans_compiled, quant_compiled), or None without numba."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


def compiled_module(name: str):
    """The compiled kernels of module `name` when `decoder()` is "compiled", else None (numpy does their work)."""
    return _compiled(name) if decoder() == "compiled" else None


def _symbol_lookup(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(packed, lookup, shift) for tables (T, A): per (table, symbol), packed = freq | next << 16 | cum << 32, next
    being the following symbol of non-zero frequency; per table, lookup holds the symbol owning the first slot of each
    bucket of 2**shift slots. A slot further into a bucket may belong to a later symbol: the decoder then follows
    `next` (at most 2**shift - 1 times)."""
    n_tables, alphabet = freq.shape
    freq64 = freq.astype(np.int64)
    cum = np.cumsum(freq64, axis=1) - freq64
    following = np.where(freq64 > 0, np.arange(alphabet), alphabet)
    following = np.minimum.accumulate(following[:, ::-1], axis=1)[:, ::-1]  # first non-zero symbol at or after s
    following = np.concatenate([following[:, 1:], np.full((n_tables, 1), alphabet - 1)], axis=1)
    following = np.minimum(following, alphabet - 1)
    packed = (freq64 | (following << 16) | (cum << 32)).astype(np.uint64).reshape(-1)
    shift = 0
    while shift < PROB_BITS and n_tables * (PROB_SCALE >> shift) > _LOOKUP_BUDGET:
        shift += 1
    bucket = 1 << shift
    first = (cum + bucket - 1) >> shift
    last = (cum + freq64 + bucket - 1) >> shift
    symbol_ids = np.broadcast_to(np.arange(alphabet, dtype=np.uint8), (n_tables, alphabet)).reshape(-1)
    lookup = np.repeat(symbol_ids, (last - first).reshape(-1))
    return packed, lookup, shift


def _decode_lanes(out: np.ndarray, batch: LaneBatch) -> None:
    """The step loop: fills out (sum(lengths),) from the batch's lanes, whose words lie per item in consecutive
    blocks. Raises CodecError on any inconsistency."""
    item_end = np.cumsum(batch.item_words)
    item_ptr = item_end - batch.item_words  # next word of each item, in the concatenated word array
    if decoder() == "compiled":
        _compiled_steps(out, batch, item_ptr, item_end)
    else:
        packed, lookup, shift = _symbol_lookup(batch.freq)
        _numpy_steps(out, batch, packed, lookup, shift, item_ptr, item_end)
    extra = np.flatnonzero(item_ptr != item_end)
    if extra.size:
        k = int(extra[0])
        where = f"item {k}: " if batch.item_words.size > 1 else ""
        raise CodecError(f"{where}{int(item_end[k] - item_ptr[k])} words are left over after the last symbol")


def _compiled_steps(out: np.ndarray, batch: LaneBatch, item_ptr: np.ndarray, item_end: np.ndarray) -> None:
    """Each item decoded on its own by the compiled loop (items in parallel); the error raised is the one the numpy
    loop, which steps all items together, meets first: the earliest step, a truncation before a bad final state
    within a step, then the lowest lane."""
    kernel = _compiled()
    cum, cum_start, first, bucket = kernel.symbol_tables(batch.freq, PROB_BITS, BUCKET_BITS)
    words = batch.words if batch.words.size else np.zeros(1, batch.words.dtype)  # the kernel reads one word ahead
    starts = np.cumsum(batch.lengths) - batch.lengths
    lane_end = np.cumsum(batch.item_lanes)
    results = np.zeros((batch.item_lanes.size, 4), dtype=np.int64)
    kernel.decode_items(out, batch.states.astype(np.int64), words, batch.lengths, batch.tables, starts,
                        lane_end - batch.item_lanes, lane_end, item_ptr, item_end, cum, cum_start, first, bucket,
                        BUCKET_BITS, PROB_BITS, STATE_LOW, WORD_BITS, results)
    failed = results[results[:, 0] != kernel.OK]
    if not failed.size:
        return
    order = {kernel.TRUNCATED: 0, kernel.BAD_FINAL_STATE: 1}
    status, lane, step, state = min(failed.tolist(), key=lambda r: (r[2], order[r[0]], r[1]))
    if status == kernel.TRUNCATED:
        raise batch.lane_error(lane, f"payload is truncated (step {step})")
    raise batch.lane_error(lane, f"final state {state} is not {STATE_LOW}: the payload is corrupt")


def _numpy_steps(out: np.ndarray, batch: LaneBatch, packed: np.ndarray, lookup: np.ndarray, shift: int,
                 item_ptr: np.ndarray, item_end: np.ndarray) -> None:
    """The step loop in numpy: each step decodes one symbol of every active lane at once."""
    states, words, lengths, tables, freq = batch.states, batch.words, batch.lengths, batch.tables, batch.freq
    lane_item, item_words = batch.lane_item, batch.item_words
    many = item_words.size > 1
    alphabet = freq.shape[1]
    fail = batch.lane_error
    n_items = item_words.size

    starts = np.cumsum(lengths) - lengths
    active = np.flatnonzero(lengths > 0)
    x = states[active]
    pos = starts[active]
    length = lengths[active]
    lbase = (tables[active] * (PROB_SCALE >> shift)).astype(np.uint64)
    tbase = (tables[active] * alphabet).astype(np.uint64)
    item = lane_item[active]
    lane_id = active
    finish = np.unique(lengths[lengths > 0])  # steps after which some lanes end
    next_finish = 0
    steps = int(finish[-1]) if finish.size else 0

    slot_mask = np.uint64(_SLOT_MASK)
    prob_bits = np.uint64(PROB_BITS)
    word_mask = np.uint64(0xFFFF)
    c_shift = np.uint64(32)
    next_shift = np.uint64(16)
    u_shift = np.uint64(shift)
    u_low = np.uint64(STATE_LOW)
    word_bits = np.uint64(WORD_BITS)
    for t in range(steps):
        slot = x & slot_mask
        s = lookup[lbase + (slot >> u_shift)]
        fc = packed[tbase + s]
        f = fc & word_mask
        d = slot - (fc >> c_shift)  # slot - cum[s] >= 0: the bucket starts inside symbol s
        wrong = np.flatnonzero(d >= f)
        while wrong.size:  # slot lies past symbol s in a bucket shared by several symbols: step to the next one
            s_w = (fc[wrong] >> next_shift) & word_mask
            fc_w = packed[tbase[wrong] + s_w]
            f_w = fc_w & word_mask
            d_w = slot[wrong] - (fc_w >> c_shift)
            s[wrong] = s_w
            fc[wrong] = fc_w
            f[wrong] = f_w
            d[wrong] = d_w
            wrong = wrong[d_w >= f_w]
        out[pos] = s
        x = f * (x >> prob_bits) + d
        need = np.flatnonzero(x < u_low)
        if need.size:
            if many:
                owner = item[need]
                count = np.bincount(owner, minlength=n_items)
                ptr = item_ptr + count
                if (ptr > item_end).any():
                    k = int(np.flatnonzero(ptr > item_end)[0])
                    short_lane = need[int(np.searchsorted(owner, k)) + int(item_end[k] - item_ptr[k])]
                    raise fail(int(lane_id[short_lane]), f"payload is truncated (step {t})")
                at = item_ptr[owner] + np.arange(need.size) - (np.cumsum(count) - count)[owner]
                item_ptr[:] = ptr
                w = words[at]
            else:
                p = int(item_ptr[0])
                if p + need.size > item_end[0]:
                    raise fail(int(lane_id[need[int(item_end[0]) - p]]), f"payload is truncated (step {t})")
                w = words[p : p + need.size]
                item_ptr[0] = p + need.size
            x[need] = (x[need] << word_bits) | w
        pos += 1
        if next_finish < finish.size and finish[next_finish] == t + 1:
            next_finish += 1
            keep = length > t + 1
            done = ~keep
            bad = np.flatnonzero(x[done] != u_low)
            if bad.size:
                lane = int(lane_id[done][bad[0]])
                raise fail(lane, f"final state {int(x[done][bad[0]])} is not {STATE_LOW}: the payload is corrupt")
            x, pos, length, lbase, tbase, item, lane_id = (
                a[keep] for a in (x, pos, length, lbase, tbase, item, lane_id)
            )
