"""Gap coding of the per-head kept positions of a pruned layer (SPEC.md §4, `kv_layer_pruned`).

Each head's positions are sorted strictly increasing and stored as gaps g_0 = p_0, g_i = p_i - p_(i-1) - 1, so
every gap is >= 0 and small when a head keeps nearby positions. Heads are concatenated in head order.
"""

from collections.abc import Sequence

import numpy as np

from .errors import MetadataError

_INT32_MAX = np.iinfo(np.int32).max


def encode_positions(per_head: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(counts int32 [kv_heads], gaps int32 [kept]) of per-head kept positions, each a 1-D integer array."""
    heads = [np.asarray(p) for p in per_head]
    if not heads:
        raise ValueError("no heads given")
    for h, p in enumerate(heads):
        if p.ndim != 1 or p.dtype.kind not in "iu":
            raise ValueError(f"head {h}: positions must be a 1-D integer array")
        if p.size == 0:
            raise ValueError(f"head {h} keeps no position")
    counts = np.array([p.size for p in heads], dtype=np.int64)
    flat = np.concatenate(heads).astype(np.int64)
    previous = np.empty_like(flat)
    previous[1:] = flat[:-1]
    previous[np.cumsum(counts) - counts] = -1  # each head starts fresh
    gaps = flat - previous - 1
    if gaps.min() < 0:
        raise ValueError("positions must be non-negative and strictly increasing within each head")
    if flat.max() > _INT32_MAX:
        raise ValueError("a position does not fit in int32")
    return counts.astype(np.int32), gaps.astype(np.int32)


def decode_positions(counts: np.ndarray, gaps: np.ndarray, tokens: int, first: int = 0) -> tuple[np.ndarray, ...]:
    """Per-head absolute positions (int64) from counts and gaps; MetadataError unless every rule of §4 holds, each
    position in [first, tokens) (`first` > 0 in a layer whose sliding window holds only the last positions, §3)."""
    counts = np.asarray(counts, dtype=np.int64)
    gaps = np.asarray(gaps, dtype=np.int64)
    if counts.ndim != 1 or gaps.ndim != 1:
        raise MetadataError("counts and positions must be 1-D")
    if counts.size and counts.min() < 1:
        raise MetadataError(f"head {int(np.argmin(counts))} keeps no position (every head keeps at least one)")
    if counts.size and counts.max() > tokens - first:
        h = int(np.argmax(counts))
        held = f", whose window holds {tokens - first}" if first else ""
        raise MetadataError(f"head {h} keeps {int(counts[h])} positions of a {tokens}-token cache{held}")
    if int(counts.sum()) != gaps.size:
        raise MetadataError(f"counts sum to {int(counts.sum())} but {gaps.size} positions are stored")
    if gaps.size and gaps.min() < 0:
        i = int(np.argmin(gaps))
        raise MetadataError(f"position gap {int(gaps[i])} at entry {i} is negative")
    # A gap >= tokens already puts a position out of range; refusing it first also keeps the cumsum small.
    if gaps.size and gaps.max() >= tokens:
        i = int(np.argmax(gaps))
        raise MetadataError(f"position gap {int(gaps[i])} at entry {i} reaches past the {tokens}-token cache")
    ends = np.cumsum(counts)
    starts = ends - counts
    steps = np.cumsum(gaps + 1)
    before = np.concatenate(([0], steps))[starts]  # steps taken before each head's first entry
    positions = steps - np.repeat(before, counts) - 1
    last = positions[ends - 1]  # each head's largest position
    if last.size and last.max() >= tokens:
        h = int(np.argmax(last))
        raise MetadataError(f"head {h} keeps position {int(last[h])} of a {tokens}-token cache")
    lowest = positions[starts]  # positions ascend within a head: its first is its smallest
    if lowest.size and lowest.min() < first:
        h = int(np.argmin(lowest))
        raise MetadataError(f"head {h} keeps position {int(lowest[h])}, before {first}, the first its window holds")
    return tuple(positions[s:e] for s, e in zip(starts, ends, strict=True))
