"""The `kv_layer_quantized` section (SPEC.md §4.3): kept positions, exact sink rows, quantized keys and values, and
the rANS lanes and probability tables of their symbols. numpy only.

A layer's kept rows are split per head into *exact* rows (positions < `exact_positions`, stored as floats) and
*quantized* rows (the rest). Symbols are entropy-coded column by column: each (head, channel) column of a head's
quantized rows is cut into lanes of `lane_rows` symbols, and every lane uses the probability table of its
(head, channel), its head, or the whole layer, whichever the writer found cheapest with the tables counted.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import codecs, rans
from .constants import bfloat16_to_float32
from .errors import MetadataError
from .positions import encode_positions
from .rope import rotate_rows
from .scalar_quantizers import (
    KEY_CENTRE,
    KEY_LEVELS,
    KeyCode,
    ValueCode,
    dequantize_keys,
    dequantize_values,
    head_index,
    quantize_keys,
    quantize_values,
    quantize_values_uniform,
)

LANE_ROWS = 1024
MAX_LANE_ROWS = 4096  # bounds what a payload can expand to: at most MAX_LANE_ROWS symbols per 4-byte lane state
TABLES = ("channel", "head", "layer")
SYMBOL_CODECS = ("rans", "zstd", "raw")
STREAMS = ("counts", "positions", "exact_keys", "exact_values", "key_zero", "key_step", "key_symbols", "key_tables",
           "value_zero", "value_step", "value_symbols", "value_tables")
VALUE_BITS = (2, 3, 4, 8)
VALUE_MODES = ("uniform", "minmax")


@dataclass(frozen=True)
class Quantization:
    """How a layer's kept K/V are quantized and coded (recorded per stream; these are the writer's choices)."""

    value_mode: str = "uniform"
    value_step: float = 0.3  # uniform: value step as a fraction of each (row, group)'s RMS
    value_bits: int = 4  # minmax: levels per group are 2^value_bits
    value_group: int = 64  # channels per value zero point/step; must divide head_dim (or exceed it: whole row)
    key_step: float = 0.25  # key step as a fraction of the head's key RMS, or of the caller's key units
    exact_positions: int = 4  # positions below this are stored exactly (attention sinks)
    coder: str = "rans"

    def check(self) -> None:
        if self.value_mode not in VALUE_MODES:
            raise ValueError(f"value mode must be one of {VALUE_MODES}, not {self.value_mode!r}")
        if self.value_bits not in VALUE_BITS:
            raise ValueError(f"value bits must be one of {VALUE_BITS}, not {self.value_bits}")
        if not 0 < self.value_step <= 16:
            raise ValueError(f"value step {self.value_step} must be in (0, 16]")
        if self.value_group < 1:
            raise ValueError("value group must be at least 1 channel")
        if not 0 < self.key_step <= 16:
            raise ValueError(f"key step {self.key_step} must be in (0, 16]")
        if self.exact_positions < 0:
            raise ValueError("exact_positions must be >= 0")
        if self.coder not in SYMBOL_CODECS:
            raise ValueError(f"unknown symbol coder {self.coder!r}")


def n_tables(tables: str, heads: int, dim: int) -> int:
    return {"channel": heads * dim, "head": heads, "layer": 1}[tables]


def lane_layout(rows_per_head: np.ndarray, dim: int, lane_rows: int, tables: str) -> tuple[np.ndarray, np.ndarray]:
    """(lane_lengths, lane_tables): for each head, each channel, the column cut into lanes of `lane_rows`."""
    lengths, table_ids = [], []
    for h, n in enumerate(int(n) for n in rows_per_head):
        chunks = [lane_rows] * (n // lane_rows) + ([n % lane_rows] if n % lane_rows else [])
        for c in range(dim):
            lengths += chunks
            table = {"channel": h * dim + c, "head": h, "layer": 0}[tables]
            table_ids += [table] * len(chunks)
    return np.array(lengths, np.int64), np.array(table_ids, np.int64)


def to_lanes(symbols: np.ndarray, rows_per_head: np.ndarray) -> np.ndarray:
    """(rows, dim) → 1-D, head by head, each head's block column by column (the lanes' concatenation)."""
    bounds = np.cumsum(rows_per_head)[:-1]
    return np.concatenate([block.T.ravel() for block in np.split(symbols, bounds)] or [symbols.ravel()])


def from_lanes(flat: np.ndarray, rows_per_head: np.ndarray, dim: int) -> np.ndarray:
    out, start = [], 0
    for n in (int(n) for n in rows_per_head):
        out.append(flat[start : start + n * dim].reshape(dim, n).T)
        start += n * dim
    return np.concatenate(out) if out else np.zeros((0, dim), np.uint8)


def _ideal_bytes(hist: np.ndarray, freq: np.ndarray) -> float:
    used = hist > 0
    return float(-(hist[used] * np.log2(freq[used] / rans.PROB_SCALE)).sum()) / 8


def encode_symbols(symbols: np.ndarray, rows_per_head: np.ndarray, alphabet: int,
                   coder: str) -> tuple[str, tuple[bytes, dict] | None, np.ndarray]:
    """Code `symbols` (rows, dim) uint8. For "rans": with the cheapest table granularity, or with zstd when that is
    smaller (tiny caches, where 4 bytes of state per lane dominate). Returns (codec, (payload, params) or None for
    the section's own codecs, tables)."""
    no_tables = np.zeros((0, alphabet), np.uint16)
    if coder != "rans":
        return coder, None, no_tables
    heads, dim = len(rows_per_head), symbols.shape[1]
    flat = to_lanes(symbols, rows_per_head)
    best = None
    for tables in TABLES:
        lengths, table_ids = lane_layout(rows_per_head, dim, LANE_ROWS, tables)
        hist = rans.histograms(flat, lengths, table_ids, n_tables(tables, heads, dim), alphabet)
        freq = rans.quantize_frequencies(hist)
        table_bytes = len(codecs.encode("zstd", freq.tobytes(), 2)[0])
        cost = _ideal_bytes(hist, freq) + table_bytes + 4 * len(lengths)
        if best is None or cost < best[0]:
            best = (cost, tables, lengths, table_ids, freq)
    cost, tables, lengths, table_ids, freq = best
    zstd_payload, zstd_params = codecs.encode("zstd", symbols.tobytes(), 1)
    if len(zstd_payload) <= cost:
        return "zstd", (zstd_payload, zstd_params), no_tables
    payload = rans.encode(flat, lengths, table_ids, freq)
    return "rans", (payload, {"lane_rows": LANE_ROWS, "tables": tables}), freq


class EncodedLayer(NamedTuple):
    streams: list  # list[Stream]
    attrs: dict


def _float_rows(rows: np.ndarray) -> tuple[str, np.ndarray]:
    half = rows.astype("<f2")
    if np.isfinite(half).all() or not np.isfinite(rows).all():
        return "float16", half
    return "float32", rows.astype("<f4")


def encode_layer(keys: np.ndarray, values: np.ndarray, positions: list[np.ndarray], q: Quantization,
                 key_unit: np.ndarray | None = None) -> EncodedLayer:
    """keys/values (kept, head_dim) float32, rows in head order; positions the per-head kept positions (sorted);
    `key_unit` (kv_heads, head_dim): the keys' step per (head, channel) at key_step 1 (quant.quantize_keys)."""
    from .writer import Stream  # the writer imports codecs only; keep this module importable on its own

    q.check()
    if not (np.isfinite(keys).all() and np.isfinite(values).all()):
        raise ValueError("the keys or values hold NaN or infinity")
    dim = keys.shape[1]
    group = min(q.value_group, dim)
    if dim % group:
        raise ValueError(f"value group {q.value_group} does not divide head_dim {dim}")
    if key_unit is not None and (key_unit.shape != (len(positions), dim) or not np.isfinite(key_unit).all()
                                 or not (key_unit > 0).all()):
        raise ValueError(f"key units must be finite and > 0, shaped ({len(positions)}, {dim})")
    counts, gaps = encode_positions(positions)
    exact = np.concatenate([p < q.exact_positions for p in positions])
    rows_q = np.array([int((p >= q.exact_positions).sum()) for p in positions], np.int64)
    kq = quantize_keys(keys[~exact].astype(np.float32), rows_q, q.key_step, key_unit)
    rows = values[~exact].astype(np.float32)
    if q.value_mode == "uniform":
        vq, value_alphabet = quantize_values_uniform(rows, q.value_step, group), KEY_LEVELS
    else:
        vq, value_alphabet = quantize_values(rows, q.value_bits, group), 1 << q.value_bits
    if not (np.isfinite(vq.zero).all() and np.isfinite(vq.step).all()):
        raise ValueError("values exceed the float16 range of their zero points and steps")
    k_codec, k_coded, k_tables = encode_symbols(kq.symbols, rows_q, KEY_LEVELS, q.coder)
    v_codec, v_coded, v_tables = encode_symbols(vq.symbols, rows_q, value_alphabet, q.coder)
    ek_dtype, exact_keys = _float_rows(keys[exact])
    ev_dtype, exact_values = _float_rows(values[exact])

    def stream(name, dtype, array, codec="zstd", encoded=None):
        data = np.ascontiguousarray(array)
        return Stream(name, dtype, tuple(data.shape), memoryview(data.reshape(-1).view(np.uint8)), codec=codec,
                      encoded=encoded)

    streams = [
        stream("counts", "int32", counts),
        stream("positions", "int32", gaps),
        stream("exact_keys", ek_dtype, exact_keys),
        stream("exact_values", ev_dtype, exact_values),
        stream("key_zero", "float32", kq.zero.astype("<f4")),
        stream("key_step", "float32", kq.step.astype("<f4")),
        stream("key_symbols", "uint8", kq.symbols, k_codec, k_coded),
        stream("key_tables", "uint16", k_tables.astype("<u2")),
        stream("value_zero", "float16", vq.zero.astype("<f2")),
        stream("value_step", "float16", vq.step.astype("<f2")),
        stream("value_symbols", "uint8", vq.symbols, v_codec, v_coded),
        stream("value_tables", "uint16", v_tables.astype("<u2")),
    ]
    return EncodedLayer(streams, {"kept": int(counts.sum()), "exact": int(exact.sum())})


class RansItem(NamedTuple):
    payload: memoryview
    lane_lengths: np.ndarray
    lane_tables: np.ndarray
    freq: np.ndarray


def rans_item(payload: memoryview, params: dict, freq: np.ndarray, rows_per_head: np.ndarray, dim: int,
              where: str) -> RansItem:
    """Check a symbol stream's rANS parameters against its section and lay out its lanes."""
    lane_rows, tables = params.get("lane_rows"), params.get("tables")
    if type(lane_rows) is not int or not 1 <= lane_rows <= MAX_LANE_ROWS:
        raise MetadataError(f"{where}: lane_rows {lane_rows!r} is not an int in [1, {MAX_LANE_ROWS}]")
    if tables not in TABLES:
        raise MetadataError(f"{where}: unknown table granularity {tables!r}")
    if freq.shape[0] != n_tables(tables, len(rows_per_head), dim):
        raise MetadataError(f"{where}: {freq.shape[0]} tables for granularity {tables!r}")
    lanes = dim * sum(-(-int(n) // lane_rows) for n in rows_per_head)
    if 4 * lanes > len(payload):
        raise MetadataError(f"{where}: {lanes} lanes need {4 * lanes} bytes of states, the stream has {len(payload)}")
    lengths, table_ids = lane_layout(rows_per_head, dim, lane_rows, tables)
    return RansItem(payload, lengths, table_ids, freq)


def split_exact(positions: tuple[np.ndarray, ...], exact_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact row mask over the layer's rows, quantized rows per head)."""
    exact = np.concatenate([p < exact_positions for p in positions])
    return exact, np.array([int((p >= exact_positions).sum()) for p in positions], np.int64)


class UndecodedLayer(NamedTuple):
    """A quantized layer read and checked up to its rANS-coded symbols (`KvcReader.read_undecoded`)."""

    layer: int
    arrays: dict[str, np.ndarray]  # every stream but the rANS-coded ones, decoded to its declared shape
    rans: dict[str, RansItem]  # "key_symbols" / "value_symbols" → its lanes, for the streams coded with rANS
    exact: np.ndarray  # (kept,) bool: rows stored as floats
    rows_q: np.ndarray  # (kv_heads,) quantized rows per head
    positions: tuple[np.ndarray, ...]


def check_parameters(arrays: dict[str, np.ndarray]) -> None:
    """Refuse non-finite or non-positive key steps, non-finite zero points, negative value steps."""
    step = arrays["key_step"]
    if not (np.isfinite(step).all() and (step > 0).all() and np.isfinite(arrays["key_zero"]).all()):
        raise MetadataError("key steps must be finite and positive, key zero points finite")
    v_zero, v_step = arrays["value_zero"], arrays["value_step"]
    if not (np.isfinite(v_zero).all() and np.isfinite(v_step).all() and (v_step >= 0).all()):
        raise MetadataError("value steps must be finite and non-negative, value zero points finite")


def check_value_symbols(arrays: dict[str, np.ndarray], value_symbols: np.ndarray) -> None:
    """Value symbols stored without rANS (whose tables bound them) must lie in the section's value alphabet."""
    alphabet = arrays["value_tables"].shape[1]
    if value_symbols.size and int(value_symbols.max()) >= alphabet:
        raise MetadataError(f"a value symbol exceeds the alphabet of {alphabet}")


def decode_layer(arrays: dict[str, np.ndarray], decoded: dict[str, np.ndarray], exact: np.ndarray,
                 rows_q: np.ndarray, positions: tuple[np.ndarray, ...] = (),
                 rope: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dequantize one layer: (keys, values), each (kept, head_dim) float32 in the stored row order. `decoded` holds
    the rANS-decoded symbol streams, 1-D in lane order (`to_lanes`); the others come from `arrays`. With `rope`
    ((cos, sin) as `rope.rotate_rows` takes them), the keys are rotated for their `positions` (per head)."""
    dim = arrays["key_zero"].shape[1]
    if "value_symbols" not in decoded:
        check_value_symbols(arrays, arrays["value_symbols"])
    check_parameters(arrays)
    keys = np.empty((exact.size, dim), np.float32)
    values = np.empty((exact.size, dim), np.float32)
    keys[exact], values[exact] = _widen(arrays["exact_keys"]), _widen(arrays["exact_values"])
    quantized_positions = np.zeros(0, np.int64)  # of the quantized rows, where they are rotated
    if rope is not None:
        row_positions = np.concatenate(positions).astype(np.int64)
        _check_rope(rope, row_positions, exact.size, dim)
        exact_keys = keys[exact]
        rotate_rows(exact_keys, row_positions[exact], *rope)
        keys[exact] = exact_keys
        quantized_positions = row_positions[~exact]
    kernel = _compiled()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below, not warned about
        if kernel is not None:
            bad = _compiled_rows(kernel, arrays, decoded, exact, rows_q, quantized_positions, rope, keys, values)
            bad += (~np.isfinite(keys[exact])).sum() + (~np.isfinite(values[exact])).sum()
        else:
            symbols = {name: from_lanes(decoded[name], rows_q, dim) if name in decoded else arrays[name]
                       for name in ("key_symbols", "value_symbols")}
            quantized_keys = dequantize_keys(KeyCode(symbols["key_symbols"], arrays["key_zero"], arrays["key_step"]),
                                             rows_q)
            if rope is not None:
                rotate_rows(quantized_keys, quantized_positions, *rope)
            keys[~exact] = quantized_keys
            values[~exact] = dequantize_values(ValueCode(symbols["value_symbols"], arrays["value_zero"],
                                                         arrays["value_step"]))
            bad = not (np.isfinite(keys).all() and np.isfinite(values).all())
    if bad:
        raise MetadataError("the layer decodes to non-finite keys or values")
    return keys, values


def _check_rope(rope: tuple[np.ndarray, np.ndarray], row_positions: np.ndarray, rows: int, dim: int) -> None:
    cos, sin = rope
    if (cos.dtype != np.float32 or sin.dtype != np.float32 or cos.ndim != 2 or sin.shape != cos.shape
            or not 0 < 2 * cos.shape[1] <= dim or row_positions.size != rows
            or (rows and int(row_positions.max()) >= cos.shape[0])):
        raise ValueError(f"RoPE tables {cos.shape} do not cover head_dim {dim} and every kept position as float32")


def _compiled():
    """The compiled dequantizer (`quant_compiled`), or None without numba or where the numpy decoder is chosen."""
    return rans.compiled_module("quant_compiled")


def _compiled_rows(kernel, arrays: dict[str, np.ndarray], decoded: dict[str, np.ndarray], exact: np.ndarray,
                   rows_q: np.ndarray, quantized_positions: np.ndarray, rope: tuple[np.ndarray, np.ndarray] | None,
                   keys: np.ndarray, values: np.ndarray) -> int:
    """Fill the quantized rows of keys and values with `quant_compiled` (rotating the keys with `rope`, if any, for
    `quantized_positions`); returns how many rows hold a value that is not finite."""
    step = arrays["value_step"].astype(np.float32)
    zero = -KEY_CENTRE * step if arrays["value_zero"].shape[0] == 0 else arrays["value_zero"].astype(np.float32)
    key_symbols, value_symbols = ((decoded[name] if name in decoded else arrays[name]).reshape(-1)
                                  for name in ("key_symbols", "value_symbols"))
    out_rows = np.flatnonzero(~exact)
    heads, dim = arrays["key_zero"].shape
    n = out_rows.size
    # The kernel does not check bounds: the reader has checked these shapes, and this repeats it where it matters.
    if (rows_q.size != heads or int(rows_q.sum()) != n or key_symbols.size != n * dim
            or value_symbols.size != n * dim or step.shape[0] != n or zero.shape != step.shape
            or step.shape[1] < 1 or dim % step.shape[1] or arrays["key_step"].shape != (heads, dim)
            or keys.shape != (exact.size, dim) or values.shape != keys.shape):
        raise MetadataError("a quantized layer's streams do not match its rows")
    no_tables = np.zeros((0, 0), np.float32)
    cos, sin = rope if rope is not None else (no_tables, no_tables)
    # Writable C-ordered arrays only: numba compiles (and `warm_up` loads) one version per array type.
    plain = [_writable(a) for a in (key_symbols, value_symbols, arrays["key_zero"], arrays["key_step"], cos, sin)]
    return kernel.dequantize_rows(plain[0], plain[1], "key_symbols" in decoded, "value_symbols" in decoded,
                                  head_index(rows_q), np.cumsum(rows_q) - rows_q, rows_q, plain[2], plain[3], zero,
                                  step, out_rows, quantized_positions, plain[4], plain[5], keys, values)


def _writable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable and a.flags.c_contiguous else a.copy()


def warm_up() -> str:
    """Load the compiled decoder now (`rans.warm_up`, then the dequantizer), so that a timed decode later does not
    pay for it. Returns `rans.decoder()`."""
    chosen = rans.warm_up()
    kernel = _compiled()
    if kernel is not None:
        one = np.ones((1, 2), np.float32)
        arrays = {"key_symbols": np.zeros((1, 2), np.uint8), "value_symbols": np.zeros((1, 2), np.uint8),
                  "key_zero": one, "key_step": one, "value_zero": np.zeros((0, 1), np.float16),
                  "value_step": np.ones((1, 1), np.float16)}
        _compiled_rows(kernel, arrays, {}, np.zeros(1, bool), np.ones(1, np.int64), np.zeros(1, np.int64),
                       (one[:, :1].copy(), one[:, :1].copy()), np.empty((1, 2), np.float32),
                       np.empty((1, 2), np.float32))
    return chosen


def _widen(rows: np.ndarray) -> np.ndarray:
    if rows.dtype == np.uint16:  # bfloat16 bit patterns
        return bfloat16_to_float32(rows)
    return rows.astype(np.float32)
