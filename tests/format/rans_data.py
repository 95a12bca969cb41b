"""Random rANS layouts whose frequency tables fit their symbols, for the coder's tests (numpy loop and compiled)."""

import numpy as np

from kvc_format import rans


def skewed_tables(rng: np.random.Generator, n_tables: int, alphabet: int, concentration: float = 0.3) -> np.ndarray:
    """(T, A) symbol probabilities, Dirichlet-skewed, with some symbols never used."""
    p = rng.dirichlet(np.full(alphabet, concentration), n_tables)
    p[p < 1e-3] = 0
    p[:, 0] += 1e-9  # keep every row non-empty
    return p / p.sum(axis=1, keepdims=True)


def draw_symbols(rng: np.random.Generator, probs: np.ndarray, lane_lengths, lane_tables) -> np.ndarray:
    """Symbols (N,) uint8, each lane drawn from its table's distribution."""
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    per_symbol_table = np.repeat(np.asarray(lane_tables), np.asarray(lane_lengths))
    u = rng.random(per_symbol_table.size)
    flat = cdf[per_symbol_table]
    return (u[:, None] >= flat).sum(axis=1).astype(np.uint8)


def coded(rng, n_lanes, max_len, n_tables, alphabet, concentration=0.3, lengths=None):
    """(symbols, lane_lengths, lane_tables, freq) of a random layout whose tables fit its symbols."""
    if lengths is None:
        lengths = rng.integers(0, max_len + 1, n_lanes)
    tables = rng.integers(0, n_tables, len(lengths))
    symbols = draw_symbols(rng, skewed_tables(rng, n_tables, alphabet, concentration), lengths, tables)
    freq = rans.quantize_frequencies(rans.histograms(symbols, lengths, tables, n_tables, alphabet))
    return symbols, lengths, tables, freq
