"""The settings a bench run measures. Each kind of setting is one line in `build_sweep`."""

from dataclasses import dataclass

from ..budget import ALLOCATIONS
from ..compress import CODECS
from ..errors import KvcError
from ..scorers import SCORERS
from .peers import PEERS

DEFAULT_RATIOS = (0.5, 0.3, 0.2, 0.1)
KVC_BITS = (16, 32)
KVC_SCORERS = tuple(SCORERS)
PRUNED_CODEC = "zstd"


@dataclass(frozen=True)
class Setting:
    label: str  # row name
    family: str  # curve name in the plot
    kind: str  # "kvc": compress → file → load; "peer": a kvpress press; "size": size baseline only
    ratio: float = 1.0  # fraction of context KV entries kept
    bits: int | None = None
    codec: str | None = None
    peer: str | None = None
    scorer: str | None = None
    allocation: str | None = None  # None: the scorer's default


def _check(ratios, bits, scorers, allocations) -> None:
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
    for a in allocations:
        if a is not None and a not in ALLOCATIONS:
            raise KvcError(f"allocation {a!r} is not one of {', '.join(ALLOCATIONS)}")


def build_sweep(ratios=DEFAULT_RATIOS, bits=(16,), scorers=("kvzip",), peers=False,
                allocations=(None,)) -> list[Setting]:
    """Lossless kvc settings, each scorer × allocation × ratio × bits, the peers at each ratio, size baselines.

    `peers`: True for every kvpress press in PEERS, or a sequence of their names.
    """
    _check(ratios, bits, scorers, allocations)
    sweep = [Setting(f"kvc {b}-bit {c}", "kvc lossless", "kvc", 1.0, b, c) for b in bits for c in CODECS]
    for s in scorers:
        for a in allocations:
            name = f"kvc {s}" + (f" {a}" if a else "")
            sweep += [Setting(f"{name} {r:g}" + (f" {b}-bit" if len(bits) > 1 else ""), name, "kvc", r, b,
                              PRUNED_CODEC, scorer=s, allocation=a) for r in ratios for b in bits]
    chosen = PEERS if peers is True else tuple(peers or ())
    for p in chosen:
        if p not in PEERS:
            raise KvcError(f"peer {p!r} is not one of {', '.join(PEERS)}")
    sweep += [Setting(f"kvpress {p} {r:g}", f"kvpress {p}", "peer", r, peer=p) for p in chosen for r in ratios]
    sweep += [Setting("fp16 safetensors", "size baselines", "size", codec="safetensors"),
              Setting("fp16 safetensors + zstd", "size baselines", "size", codec="safetensors+zstd")]
    return sweep
