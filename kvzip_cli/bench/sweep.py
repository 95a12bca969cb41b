"""The settings a bench run measures. Each kind of setting is one line in `build_sweep`."""

from dataclasses import dataclass

from ..compress import CODECS
from ..errors import KvcError
from .peers import PEERS

DEFAULT_RATIOS = (0.5, 0.3, 0.2, 0.1)
KVC_BITS = (16, 32)
KVC_SCORERS: tuple[str, ...] = ()  # query-agnostic scorers join here as they land


@dataclass(frozen=True)
class Setting:
    label: str  # row name
    family: str  # curve name in the plot
    kind: str  # "kvc": compress → file → load; "peer": a kvpress press; "size": size baseline only
    ratio: float = 1.0  # fraction of context KV entries kept
    bits: int | None = None
    codec: str | None = None
    peer: str | None = None


def _check(ratios, bits, scorers) -> None:
    for r in ratios:
        if not 0 < r <= 1:
            raise KvcError(f"ratio {r} is out of range: ratios are kept fractions, 0 < r <= 1")
    for b in bits:
        if b not in KVC_BITS:
            raise KvcError(f"--bits {b} is not available in this version (available: {', '.join(map(str, KVC_BITS))})")
    for s in scorers:
        if s not in KVC_SCORERS:
            available = ", ".join(KVC_SCORERS) or "none yet"
            raise KvcError(f"scorer {s!r} is not available in this version (available: {available})")


def build_sweep(ratios=DEFAULT_RATIOS, bits=(16,), scorers=KVC_SCORERS, peers=False) -> list[Setting]:
    _check(ratios, bits, scorers)
    sweep = [Setting(f"kvc {b}-bit {c}", "kvc lossless", "kvc", 1.0, b, c) for b in bits for c in CODECS]
    if peers:
        sweep += [Setting(f"kvpress {p} {r:g}", f"kvpress {p}", "peer", r, peer=p) for p in PEERS for r in ratios]
    sweep += [Setting("fp16 safetensors", "size baselines", "size", codec="safetensors"),
              Setting("fp16 safetensors + zstd", "size baselines", "size", codec="safetensors+zstd")]
    return sweep
