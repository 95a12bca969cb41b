"""Interleaved rANS (kvc_format.rans): byte-exact agreement with a scalar reference of the spec, round trips over
lane layouts, coding cost against the ideal and the empirical entropy, frequency quantisation, hostile payloads."""

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvc_format import CodecError, rans
from kvc_format.rans import PROB_BITS, PROB_SCALE, STATE_LOW

from rans_data import coded, draw_symbols


@pytest.fixture(autouse=True, params=["numpy", "compiled"])
def step_loop(request, monkeypatch):
    """Every test here runs with both decoders: the numpy loop (the fallback without numba) and the compiled one.
    Under CI numba must be there (it comes with the test extra); elsewhere its absence skips the compiled runs."""
    if request.param == "compiled" and rans._compiled() is None:
        if os.environ.get("CI"):
            pytest.fail("numba is missing: the compiled rANS decoder cannot be tested")
        pytest.skip("numba is not installed")
    monkeypatch.setenv("KVC_RANS_DECODER", request.param)
    assert rans.decoder() == request.param
    return request.param

# ------------------------------------------------------------------------------------------- scalar reference


def reference_encode(symbols, lane_lengths, lane_tables, freq) -> bytes:
    """One lane at a time, in plain Python integers, exactly as the spec words it."""
    cum = [[sum(int(v) for v in row[:s]) for s in range(len(row))] for row in freq]
    emitted: dict[int, list[tuple[int, int]]] = {}
    finals = []
    start = 0
    for lane, (n, table) in enumerate(zip(lane_lengths, lane_tables, strict=True)):
        x = STATE_LOW
        for t in range(int(n) - 1, -1, -1):
            s = int(symbols[start + t])
            f, c = int(freq[table][s]), cum[table][s]
            if x >= f << (32 - PROB_BITS):
                emitted.setdefault(t, []).append((lane, x & 0xFFFF))
                x >>= 16
            x = ((x // f) << PROB_BITS) + x % f + c
        finals.append(x)
        start += int(n)
    words = [w for t in sorted(emitted) for _, w in sorted(emitted[t])]
    return np.array(finals, dtype="<u4").tobytes() + np.array(words, dtype="<u2").tobytes()


def reference_decode(payload: bytes, lane_lengths, lane_tables, freq) -> list[int]:
    """Step by step over all lanes, words handed out in lane order at each step."""
    n_lanes = len(lane_lengths)
    x = list(np.frombuffer(payload[: 4 * n_lanes], dtype="<u4").tolist())
    words = np.frombuffer(payload[4 * n_lanes :], dtype="<u2").tolist()
    cum = [[sum(int(v) for v in row[:s]) for s in range(len(row))] for row in freq]
    starts = np.concatenate([[0], np.cumsum(lane_lengths)[:-1]]).astype(int) if n_lanes else []
    out = [0] * int(sum(lane_lengths))
    w = 0
    for t in range(max(lane_lengths, default=0)):
        for lane in range(n_lanes):
            if t >= lane_lengths[lane]:
                continue
            table = lane_tables[lane]
            slot = x[lane] & (PROB_SCALE - 1)
            s = next(s for s in range(len(freq[table])) if cum[table][s] <= slot < cum[table][s] + freq[table][s])
            out[starts[lane] + t] = s
            x[lane] = int(freq[table][s]) * (x[lane] >> PROB_BITS) + slot - cum[table][s]
            if x[lane] < STATE_LOW:
                x[lane] = (x[lane] << 16) | words[w]
                w += 1
    assert w == len(words) and all(v == STATE_LOW for v in x)
    return out


# ------------------------------------------------------------------------------------------- the spec


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_lanes=st.integers(0, 9),
    max_len=st.sampled_from([1, 3, 30]),
    n_tables=st.integers(1, 3),
    alphabet=st.sampled_from([2, 3, 16, 256]),
)
def test_matches_scalar_reference(seed, n_lanes, max_len, n_tables, alphabet):
    rng = np.random.default_rng(seed)
    symbols, lengths, tables, freq = coded(rng, n_lanes, max_len, n_tables, alphabet)
    payload = rans.encode(symbols, lengths, tables, freq)
    assert payload == reference_encode(symbols, lengths.tolist(), tables.tolist(), freq.tolist())
    assert reference_decode(payload, lengths.tolist(), tables.tolist(), freq.tolist()) == symbols.tolist()
    decoded = rans.decode(payload, lengths, tables, freq)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, symbols)


def test_word_interleaving_by_step_then_lane():
    # Two lanes, one table where symbol 1 is rare: every rare symbol makes a lane emit. The words must come out by
    # step ascending, then lane ascending, whatever lane emitted first while encoding.
    freq = np.array([[PROB_SCALE - 1, 1]], dtype=np.uint16)
    symbols = np.array([1, 1, 0, 1, 1, 1], dtype=np.uint8)
    lengths, tables = np.array([3, 3]), np.array([0, 0])
    payload = rans.encode(symbols, lengths, tables, freq)
    assert payload == reference_encode(symbols, [3, 3], [0, 0], freq.tolist())
    assert len(payload) > 8
    assert np.array_equal(rans.decode(payload, lengths, tables, freq), symbols)


def test_certain_symbol_costs_nothing():
    freq = np.array([[0, PROB_SCALE, 0]], dtype=np.uint16)
    lengths = np.array([1000, 0, 5])
    payload = rans.encode(np.ones(1005, dtype=np.uint8), lengths, np.zeros(3, dtype=np.int64), freq)
    assert payload == np.full(3, STATE_LOW, dtype="<u4").tobytes()
    assert np.array_equal(rans.decode(payload, lengths, [0, 0, 0], freq), np.ones(1005, dtype=np.uint8))


def test_no_lanes():
    freq = np.array([[PROB_SCALE, 0]], dtype=np.uint16)
    empty = np.zeros(0, dtype=np.int64)
    assert rans.encode(np.zeros(0, dtype=np.uint8), empty, empty, freq) == b""
    assert rans.decode(b"", empty, empty, freq).shape == (0,)
    assert rans.decode_many([]) == []


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("n_lanes", "max_len", "n_tables", "alphabet"),
    [(1, 5000, 1, 2), (300, 40, 7, 16), (50, 200, 50, 256), (2000, 3, 40, 16), (64, 1, 3, 2)],
)
def test_round_trip_layouts(n_lanes, max_len, n_tables, alphabet):
    rng = np.random.default_rng(n_lanes * 7 + alphabet)
    symbols, lengths, tables, freq = coded(rng, n_lanes, max_len, n_tables, alphabet)
    payload = rans.encode(symbols, lengths, tables, freq)
    assert np.array_equal(rans.decode(payload, lengths, tables, freq), symbols)
    assert np.array_equal(rans.decode(memoryview(payload), lengths, tables, freq), symbols)


@pytest.mark.parametrize("budget", [1, 4096, 1 << 30])
def test_every_lookup_resolution_decodes(monkeypatch, budget):
    # budget 1: one lookup bucket per table, so every slot is found by walking symbols (zero-frequency gaps
    # included); 1 << 30: one entry per slot.
    rng = np.random.default_rng(budget)
    counts = rng.integers(0, 10**6, (9, 256)) * (rng.random((9, 256)) < 0.3)
    counts[rng.random((9, 256)) < 0.2] = 1  # frequency 1 after quantisation
    freq = rans.quantize_frequencies(counts)
    assert (freq == 0).any() and (freq == 1).any()
    lengths = rng.integers(0, 61, 200)
    tables = rng.integers(0, 9, 200)
    symbols = draw_symbols(rng, freq / PROB_SCALE, lengths, tables)
    payload = rans.encode(symbols, lengths, tables, freq)
    monkeypatch.setattr(rans, "_LOOKUP_BUDGET", budget)
    assert np.array_equal(rans.decode(payload, lengths, tables, freq), symbols)


def test_decode_many_equals_separate_decodes():
    rng = np.random.default_rng(5)
    items, expected = [], []
    for n_lanes, max_len, n_tables, alphabet in [(30, 50, 3, 16), (0, 1, 1, 2), (5, 400, 2, 256), (80, 7, 9, 2)]:
        symbols, lengths, tables, freq = coded(rng, n_lanes, max_len, n_tables, alphabet)
        items.append((rans.encode(symbols, lengths, tables, freq), lengths, tables, freq))
        expected.append(symbols)
    many = rans.decode_many(items)
    assert len(many) == len(items)
    for got, item, symbols in zip(many, items, expected, strict=True):
        assert np.array_equal(got, symbols)
        assert np.array_equal(rans.decode(*item), symbols)


def test_histograms_count_per_table():
    symbols = np.array([1, 1, 0, 2, 2, 2, 1], dtype=np.uint8)
    counts = rans.histograms(symbols, [2, 0, 1, 4], [1, 0, 1, 0], 3, 4)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[0, 1, 3, 0], [1, 2, 0, 0], [0, 0, 0, 0]]


# ------------------------------------------------------------------------------------------- coding cost


def ideal_bits(symbols, lengths, tables, freq) -> float:
    f = freq[np.repeat(tables, lengths), symbols].astype(np.float64)
    return float(-np.log2(f / PROB_SCALE).sum())


def test_cost_close_to_ideal_and_entropy():
    rng = np.random.default_rng(11)
    n_lanes, n_tables = 240, 6
    symbols, lengths, tables, freq = coded(rng, n_lanes, 0, n_tables, 16, lengths=np.full(n_lanes, 500))
    assert symbols.size >= 100_000
    payload = rans.encode(symbols, lengths, tables, freq)
    ideal = ideal_bits(symbols, lengths, tables, freq)
    assert len(payload) <= 1.02 * ideal / 8 + 4 * n_lanes + 2
    counts = rans.histograms(symbols, lengths, tables, n_tables, 16).astype(np.float64)
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    entropy = float(-(counts * np.log2(np.where(counts > 0, p, 1))).sum())
    assert entropy <= ideal <= 1.01 * entropy


def test_cost_close_to_ideal_wide_alphabet():
    rng = np.random.default_rng(12)
    symbols, lengths, tables, freq = coded(rng, 100, 0, 2, 256, concentration=1.0, lengths=np.full(100, 1000))
    payload = rans.encode(symbols, lengths, tables, freq)
    assert len(payload) <= 1.02 * ideal_bits(symbols, lengths, tables, freq) / 8 + 4 * 100 + 2


# ------------------------------------------------------------------------------------------- quantisation


def check_quantized(counts: np.ndarray) -> np.ndarray:
    freq = rans.quantize_frequencies(counts)
    assert freq.dtype == np.uint16 and freq.shape == counts.shape
    assert (freq.sum(axis=1, dtype=np.int64) == PROB_SCALE).all()
    used = (counts > 0).any(axis=1)
    assert ((freq[used] > 0) == (counts[used] > 0)).all()
    assert (freq[~used, 0] == PROB_SCALE).all()
    rans.validate_tables(freq, counts.shape[1])
    return freq


@settings(max_examples=60, deadline=None)
@given(
    alphabet=st.sampled_from([2, 5, 16, 256]),
    rows=st.integers(1, 6),
    magnitude=st.sampled_from([1, 10, 10**4, 10**9, 2**62]),
    zero_share=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_properties(alphabet, rows, magnitude, zero_share, seed):
    rng = np.random.default_rng(seed)
    counts = (rng.random((rows, alphabet)) ** 3 * magnitude).astype(np.int64)
    counts[rng.random((rows, alphabet)) < zero_share] = 0
    check_quantized(counts)


def test_quantize_edge_rows():
    counts = np.zeros((5, 256), dtype=np.int64)
    counts[1, 7] = 3  # one symbol: all the mass
    counts[2] = 1  # all 256 symbols equal
    counts[3] = 1
    counts[3, 0] = 10**12  # one dominant symbol, 255 rare ones that each still need 1
    counts[4, :2] = [1, 10**6]
    freq = check_quantized(counts)
    assert freq[0, 0] == PROB_SCALE and freq[1, 7] == PROB_SCALE
    assert (freq[2] == 16).all()
    assert freq[3, 0] == PROB_SCALE - 255 and (freq[3, 1:] == 1).all()
    assert freq[4].tolist()[:2] == [1, PROB_SCALE - 1]
    assert np.array_equal(rans.quantize_frequencies(counts), freq)  # deterministic


def test_quantize_is_close_to_proportional():
    counts = np.array([[500, 300, 150, 49, 1, 0]])
    freq = check_quantized(counts)[0].astype(np.float64)
    share = counts[0] / counts.sum() * PROB_SCALE
    assert np.abs(freq - share)[:4].max() <= 1.5


# ------------------------------------------------------------------------------------------- hostile payloads


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(21)
    symbols, lengths, tables, freq = coded(rng, 40, 300, 4, 16, lengths=rng.integers(1, 301, 40))
    return rans.encode(symbols, lengths, tables, freq), lengths, tables, freq


def test_truncated_or_extended_payload(sample):
    payload, lengths, tables, freq = sample
    with pytest.raises(CodecError, match="truncated"):
        rans.decode(payload[:-2], lengths, tables, freq)
    with pytest.raises(CodecError, match="left over"):
        rans.decode(payload + b"\0\0", lengths, tables, freq)
    with pytest.raises(CodecError, match="odd"):
        rans.decode(payload[:-1], lengths, tables, freq)
    with pytest.raises(CodecError, match="shorter"):
        rans.decode(payload[: 4 * len(lengths) - 4], lengths, tables, freq)


def test_bad_stored_states(sample):
    payload, lengths, tables, freq = sample
    states = np.frombuffer(payload, dtype="<u4", count=len(lengths)).copy()
    low = states.copy()
    low[3] = STATE_LOW - 1
    with pytest.raises(CodecError, match="below"):
        rans.decode(low.tobytes() + payload[4 * len(lengths) :], lengths, tables, freq)
    with_empty = np.concatenate([lengths, [0]])
    tables_empty = np.concatenate([tables, [0]])
    bad_empty = payload[: 4 * len(lengths)] + np.array([STATE_LOW + 1], "<u4").tobytes() + payload[4 * len(lengths) :]
    with pytest.raises(CodecError, match="empty lane"):
        rans.decode(bad_empty, with_empty, tables_empty, freq)


def flip(payload: bytes, bit: int) -> bytes:
    data = bytearray(payload)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


@pytest.mark.parametrize("region", ["states", "words"])
def test_bit_flips_are_detected(sample, region):
    payload, lengths, tables, freq = sample
    head = 32 * len(lengths)
    low, high = (0, head) if region == "states" else (head, 8 * len(payload))
    bits = np.random.default_rng(3 if region == "states" else 4).integers(low, high, 50)
    detected = 0
    for bit in bits.tolist():
        try:
            rans.decode(flip(payload, bit), lengths, tables, freq)
        except CodecError:
            detected += 1
    assert detected >= 48


def test_decode_many_names_the_bad_item(sample):
    payload, lengths, tables, freq = sample
    with pytest.raises(CodecError, match="item 1: .*truncated"):
        rans.decode_many([sample, (payload[:-2], lengths, tables, freq), sample])
    with pytest.raises(CodecError, match="item 2: .*left over"):
        rans.decode_many([sample, sample, (payload + b"\1\0", lengths, tables, freq)])


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=400),
    n_lanes=st.integers(0, 6),
    length=st.integers(0, 50),
    alphabet=st.sampled_from([2, 16]),
)
def test_random_payloads_never_crash(data, n_lanes, length, alphabet):
    freq = np.zeros((2, alphabet), dtype=np.uint16)
    freq[0] = PROB_SCALE // alphabet
    freq[1, 0], freq[1, -1] = PROB_SCALE - 1, 1
    lengths = np.full(n_lanes, length)
    tables = np.arange(n_lanes) % 2
    try:
        out = rans.decode(data, lengths, tables, freq)
    except CodecError:
        return
    assert out.shape == (n_lanes * length,)
    assert rans.encode(out, lengths, tables, freq) == data  # what decodes is exactly what the encoder writes


# ------------------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "freq",
    [
        np.full((2, 16), 256, dtype=np.int64),  # wrong dtype
        np.full(16, 256, dtype=np.uint16),  # 1-D
        np.array([[PROB_SCALE, 0], [PROB_SCALE - 1, 0]], dtype=np.uint16),  # a row short of M
        np.array([[PROB_SCALE]], dtype=np.uint16),  # alphabet 1
        np.full((1, 257), 0, dtype=np.uint16),  # alphabet 257
        [[PROB_SCALE, 0]],  # not an array
    ],
)
def test_invalid_tables(sample, freq):
    payload, lengths, tables, _ = sample
    with pytest.raises(CodecError):
        rans.decode(payload, lengths, np.zeros_like(tables), freq)
    with pytest.raises(CodecError):
        rans.encode(np.zeros(int(lengths.sum()), dtype=np.uint8), lengths, np.zeros_like(tables), freq)


def test_validate_tables():
    good = np.array([[PROB_SCALE - 1, 1], [0, PROB_SCALE]], dtype=np.uint16)
    rans.validate_tables(good, 2)
    with pytest.raises(CodecError, match="shape"):
        rans.validate_tables(good, 3)
    with pytest.raises(CodecError, match="sums to"):
        rans.validate_tables(np.array([[PROB_SCALE, 1]], dtype=np.uint16), 2)
    with pytest.raises(CodecError, match="alphabet"):
        rans.validate_tables(good, 1)


@pytest.mark.parametrize(
    ("lengths", "tables", "match"),
    [
        ([3, -1], [0, 0], "negative"),
        ([1, 1], [0, 4], "table 4"),
        ([1, 1], [0, -1], "table -1"),
        ([1, 1], [0], "lane tables"),
        ([[1, 1]], [[0, 0]], "1-D"),
        ([1.0, 1.0], [0, 0], "integers"),
        ([2**62, 2**62], [0, 0], "too large"),
    ],
)
def test_invalid_layouts(lengths, tables, match):
    freq = np.array([[PROB_SCALE // 2, PROB_SCALE // 2]] * 2, dtype=np.uint16)
    with pytest.raises(CodecError, match=match):
        rans.decode(b"\0" * 8, lengths, tables, freq)
    with pytest.raises(CodecError, match=match):
        rans.encode(np.zeros(2, dtype=np.uint8), lengths, tables, freq)


def test_encode_rejects_bad_symbols():
    freq = np.array([[PROB_SCALE, 0, 0]], dtype=np.uint16)
    with pytest.raises(CodecError, match="sum to"):
        rans.encode(np.zeros(3, dtype=np.uint8), [2], [0], freq)
    with pytest.raises(ValueError, match="frequency 0"):
        rans.encode(np.array([0, 2], dtype=np.uint8), [2], [0], freq)
    with pytest.raises(ValueError, match="alphabet"):
        rans.encode(np.array([0, 3], dtype=np.uint8), [2], [0], freq)
    with pytest.raises(ValueError, match="alphabet"):
        rans.histograms(np.array([0, 3], dtype=np.uint8), [2], [0], 1, 3)


def test_states_stay_below_two_to_the_32():
    # The largest frequency and the largest state: decoding x = f * (x >> 12) + (slot - cum) stays < 2**32.
    rng = np.random.default_rng(8)
    freq = np.array([[PROB_SCALE - 1, 1]], dtype=np.uint16)
    symbols = (rng.random(20_000) < 0.001).astype(np.uint8)
    payload = rans.encode(symbols, [20_000], [0], freq)
    assert np.array_equal(rans.decode(payload, [20_000], [0], freq), symbols)
    assert math.isclose(len(payload), ideal_bits(symbols, [20_000], [0], freq) / 8 + 4, rel_tol=0.05, abs_tol=8)

