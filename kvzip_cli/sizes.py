"""Sizes kvc reports, computed without torch."""


def raw_fp16_bytes(entries: int, head_dim: int) -> int:
    """What the model's own cache of the context holds in float16: K and V of `entries` (head, position) entries
    over all layers (kvc_format.CacheGeometry.held_entries: a sliding-window layer holds only its window),
    2 × entries × head_dim × 2 bytes."""
    return 2 * entries * head_dim * 2
