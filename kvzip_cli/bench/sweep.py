"""The settings a bench run measures. Each kind of setting is one line in `build_sweep`."""

from dataclasses import dataclass

from ..compress.presets import PRESETS
from ..compress.settings import FLOAT_BITS, QUANT_BITS, QuantOptions, Settings, default_codec
from ..errors import UsageError
from ..prune import ALLOCATIONS
from ..prune.scorers import DEFAULT_SCORER, SCORERS

DEFAULT_RATIOS = (0.5, 0.3, 0.2, 0.1)
PEERS = ("KVzipPress", "CompactorPress", "SnapKVPress", "KnormPress")  # NVIDIA kvpress presses (peers.py runs them)
# --refit choice → build_sweep's refits: "bias" (values refit with a logit bias, as kvc compress does), "values"
# (values refit alone, as --no-logit-bias), "off" (neither, as --no-refit)
REFITS = {"on": ("bias",), "values": ("values",), "off": ("off",), "both": ("bias", "off"),
          "all": ("bias", "values", "off")}
REFIT_LABELS = {"bias": "", "values": " values-refit", "off": " no-refit"}
KVC_BITS = FLOAT_BITS + QUANT_BITS
KVC_SCORERS = tuple(SCORERS)
# Codecs measured on the full cache at each bit width: floats raw and zstd (both lossless); quantized symbols with
# the entropy coder and with zstd, so the coder's margin over zstd is measured on the same symbols.
FULL_CACHE_CODECS = {16: ("raw", "zstd"), 32: ("raw", "zstd"), **{b: ("ans", "zstd") for b in QUANT_BITS}}


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
    key_bits: int | None = None  # None: as bits
    refit: str = "bias"  # pruned kvc settings: "bias", "values" or "off" (REFITS, kvzip_cli.prune.refit)

    def compress_settings(self) -> Settings:
        """A "kvc" setting as the compress settings it measures (checked: a UsageError names what is wrong)."""
        settings = Settings(ratio=self.ratio, scorer=self.scorer or DEFAULT_SCORER, allocation=self.allocation,
                            bits=self.bits, codec=self.codec, quant=QuantOptions(key_bits=self.key_bits),
                            refit=self.refit != "off", logit_bias=self.refit == "bias", estimate=False)
        settings.check()
        return settings


def _check(ratios, bits, scorers, allocations, presets) -> None:
    for r in ratios:
        if not 0 < r <= 1:
            raise UsageError(f"ratio {r} is out of range: ratios are kept fractions, 0 < r <= 1")
    for b in bits:
        if b not in KVC_BITS:
            raise UsageError(f"--bits {b} is not available in this version (available: "
                             f"{', '.join(map(str, KVC_BITS))})")
    for s in scorers:
        if s not in KVC_SCORERS:
            available = ", ".join(KVC_SCORERS) or "none yet"
            raise UsageError(f"scorer {s!r} is not available in this version (available: {available})")
    for a in allocations:
        if a is not None and a not in ALLOCATIONS:
            raise UsageError(f"allocation {a!r} is not one of {', '.join(ALLOCATIONS)}")
    for p in presets:
        if p not in PRESETS:
            raise UsageError(f"preset {p!r} is not one of {', '.join(PRESETS)}")


def _full_cache_family(bits: int) -> str:
    return "kvc lossless" if bits in FLOAT_BITS else "kvc quantized"


def _refit_label(refit: str) -> str:
    return REFIT_LABELS[refit]


def build_sweep(ratios=DEFAULT_RATIOS, bits=(16,), scorers=("kvzip",), peers=False,
                allocations=(None,), presets=(), refits=("bias",)) -> list[Setting]:
    """The full cache at each bit width and codec, each scorer × allocation × refit × ratio × bits, the named presets
    (each refit choice), the peers at each ratio, size baselines.

    `peers`: True for every kvpress press in PEERS, or a sequence of their names. `refits`: any of "bias", "values"
    and "off"; settings refit without the bias are labelled "values-refit", those not refit "no-refit".
    """
    _check(ratios, bits, scorers, allocations, presets)
    sweep = [Setting(f"kvc {b}-bit {c}", _full_cache_family(b), "kvc", 1.0, b, c)
             for b in bits for c in FULL_CACHE_CODECS[b]]
    for s in scorers:
        for a in allocations:
            for refit in refits:
                name = f"kvc {s}" + (f" {a}" if a else "") + _refit_label(refit)
                sweep += [Setting(f"{name} {r:g}" + (f" {b}-bit" if len(bits) > 1 else ""),
                                  name + (f" {b}-bit" if len(bits) > 1 else ""), "kvc", r, b, default_codec(b),
                                  scorer=s, allocation=a, refit=refit) for b in bits for r in ratios]
    measured = set()
    for refit in refits:
        for name in presets:
            p = Settings.from_preset(name)
            # "bias" is what kvc compress does, which for a preset without the logit bias is the values refit alone
            own = "values" if refit == "bias" and not p.logit_bias else refit
            if (name, own) in measured:
                continue
            measured.add((name, own))
            sweep.append(Setting(f"preset {name}{_refit_label(refit)}", f"kvc presets{_refit_label(refit)}", "kvc",
                                 p.ratio, p.bits, p.codec, scorer=p.scorer, key_bits=p.quant.key_bits, refit=own))
    chosen = PEERS if peers is True else tuple(peers or ())
    for p in chosen:
        if p not in PEERS:
            raise UsageError(f"peer {p!r} is not one of {', '.join(PEERS)}")
    sweep += [Setting(f"kvpress {p} {r:g}", f"kvpress {p}", "peer", r, peer=p) for p in chosen for r in ratios]
    sweep += [Setting("fp16 safetensors", "size baselines", "size", codec="safetensors"),
              Setting("fp16 safetensors + zstd", "size baselines", "size", codec="safetensors+zstd")]
    return sweep
