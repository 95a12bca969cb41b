"""Sizes kvc reports, computed without torch."""


def raw_fp16_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int) -> int:
    """The full context KV in float16: 2 (K and V) × layers × kv_heads × head_dim × tokens × 2 bytes."""
    return 2 * layers * kv_heads * head_dim * tokens * 2
