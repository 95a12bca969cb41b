"""Named compression presets: each a documented combination of ratio, scorer, bits and codec, chosen from the bench
(studies/bench-corpus/results/frontier/ and studies/bench-corpus/results/logit-bias-bench/). Options given
explicitly override the preset's."""

from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Preset:
    name: str
    ratio: float
    scorer: str
    bits: int  # values (and keys unless key_bits is set)
    codec: str
    summary: str
    key_bits: int | None = None
    logit_bias: bool = True  # with the refit: also fit a logit bias per kept entry (kvzip_cli.prune.refit)


PRESETS = {
    p.name: p
    for p in (
        # 16-bit floats: bit-exact for a model computing in bfloat16 or float16 (a GPU), float16 rounding of float32
        # KV (a CPU; kld ~3e-7), where --bits 32 is bit-exact.
        Preset("lossless", 1.0, "kvzip", 16, "zstd", "every entry, 16-bit floats (float32 KV rounded to float16), "
               "zstd"),
        Preset("balanced", 0.25, "kvzip", 3, "ans", "25% of entries (KVzip), values refit with a logit bias, 3-bit "
               "keys and values, rANS-coded"),
        # No logit bias: at 12% kept and 2-bit values it raised kld and repetition (docs/pruning.md, "Refit").
        Preset("small", 0.12, "kvzip", 2, "ans", "12% of entries (KVzip), values refit, 3-bit keys, 2-bit "
               "values, rANS-coded",
               key_bits=3, logit_bias=False),
    )
}
DEFAULT_PRESET = "balanced"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name]
