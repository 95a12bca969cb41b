"""The settings a document is compressed with, as one frozen object: `Settings.from_options` builds them from a
preset and the options given over it, checks them once (UsageError), and `record` is what a file's header keeps.

Torch-free: the command line builds and checks them before it imports torch or reads a document.
"""

from dataclasses import asdict, dataclass, field, replace

from ..errors import UsageError
from ..prune import check_allocation, default_logit_bias
from ..prune.scorers import DEFAULT_SCORER, check_scorer
from .presets import DEFAULT_PRESET, Preset, get_preset

COMPRESS_CODECS = ("raw", "zstd", "ans")  # what --codec takes; "ans" writes kvc_format.codecs' "rans" streams
FLOAT_BITS = (16, 32)
QUANT_BITS = (8, 4, 3, 2)
DEFAULT_CHUNK = 512
DEFAULT_BUDGET = 4.0  # a target's search time, in prefills of the document


def default_codec(bits: int) -> str:
    return "ans" if bits in QUANT_BITS else "zstd"


@dataclass(frozen=True)
class QuantOptions:
    """Quantization knobs beyond `bits`: key precision in bits when it differs from the values' (keys carry most of
    the error), channels sharing one value step (None: the whole head), whether keys are stored with RoPE removed
    (None: when the model's RoPE can be undone) and whether key steps are weighted by the document's queries
    (kvzip_cli.compress.key_units; False: one step per head, from its key RMS)."""

    key_bits: int | None = None
    value_group: int | None = None
    pre_rope: bool | None = None
    query_weighted_keys: bool = True


@dataclass(frozen=True)
class Target:
    """What a calibrated file's self-check must reach: top1 at least `top1`, kld at most `kld` (either or both)."""

    top1: float | None = None
    kld: float | None = None

    def check(self) -> None:
        if self.top1 is None and self.kld is None:
            raise UsageError("give --target-top1 or --target-kld")
        if self.top1 is not None and not 0 < self.top1 <= 1:
            raise UsageError(f"--target-top1 {self.top1} is out of range: it is a fraction, 0 < top1 <= 1")
        if self.kld is not None and not self.kld > 0:
            raise UsageError(f"--target-kld {self.kld} is out of range: it must be > 0 (nats per token)")

    def met(self, result) -> bool:
        """Whether a self-check result (kvzip_cli.evaluation.self_check.SelfCheckResult) meets the target."""
        return (self.top1 is None or result.top1 >= self.top1) and (self.kld is None or result.kld <= self.kld)

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def check_budget(budget: float) -> None:
    if not budget > 0:
        raise UsageError(f"--budget {budget:g} must be > 0 (prefills of search time)")


def check_settings(codec: str, ratio: float, bits: int, chunk_size: int, scorer: str,
                   allocation: str | None, quant: QuantOptions = QuantOptions()) -> None:
    if codec not in COMPRESS_CODECS:
        raise UsageError(f"unknown codec {codec!r}: use one of {', '.join(COMPRESS_CODECS)}")
    if bits not in FLOAT_BITS + QUANT_BITS:
        raise UsageError(f"--bits {bits}: use 16 or 32 (floats) or {', '.join(map(str, QUANT_BITS))} (quantized)")
    if codec == "ans" and bits in FLOAT_BITS:
        raise UsageError(f"--codec ans entropy-codes quantized symbols: use it with --bits "
                         f"{'|'.join(map(str, QUANT_BITS))}, or --codec zstd for {bits}-bit floats")
    if quant.key_bits is not None and (quant.key_bits not in QUANT_BITS or bits not in QUANT_BITS):
        raise UsageError(f"--key-bits {quant.key_bits}: use one of {', '.join(map(str, QUANT_BITS))}, with --bits "
                         "quantized too")
    if quant.value_group is not None and quant.value_group < 1:
        raise UsageError(f"--group {quant.value_group} must be at least 1")
    if not 0 < ratio <= 1:
        raise UsageError(f"--ratio {ratio} is out of range: it is the kept fraction, 0 < ratio <= 1")
    check_scorer(scorer)
    if allocation is not None:
        check_allocation(allocation)
    if chunk_size < 1:
        raise UsageError(f"--chunk-size {chunk_size} must be at least 1")


def _flag(name: str, value) -> str:
    flag = f"--{name.replace('_', '-')}"
    return flag if value is not False else flag.replace("--", "--no-", 1)


def preset_record(chosen: Preset, **given) -> dict:
    """What a file records of its preset: the preset's name and the options given that change it."""
    own = {"ratio": chosen.ratio, "scorer": chosen.scorer, "bits": chosen.bits, "codec": chosen.codec,
           "key_bits": chosen.key_bits, "logit_bias": chosen.logit_bias}
    changed = [_flag(name, value) for name, value in given.items() if value is not None and value != own[name]]
    return {"preset": chosen.name, "overrides": changed}


@dataclass(frozen=True)
class Settings:
    """How a document becomes a file. With `target` set, the ratio and bits are searched for instead (the smallest
    file whose self-check meets it, within `budget` prefills; kvzip_cli.compress.calibrate), and the values are not
    refit: the self-check's reconstruction probes are close to the refit's own queries, so it would overrate refit
    candidates."""

    ratio: float = 1.0  # kept fraction of the entries the model's cache holds
    scorer: str = DEFAULT_SCORER
    allocation: str | None = None  # None: the scorer's own
    bits: int = 16  # values' bits (and keys' unless quant.key_bits); 16 and 32 store floats
    codec: str = "zstd"
    quant: QuantOptions = QuantOptions()
    refit: bool = True  # pruned files: refit the kept values (kvzip_cli.prune.refit)
    logit_bias: bool = False  # with the refit: also a logit bias per kept entry
    chunk_size: int = DEFAULT_CHUNK
    preset: str | None = None  # the preset they start from (None: a target's search)
    overrides: tuple[str, ...] = field(default=())  # the options given that change the preset, as flags
    target: Target | None = None
    budget: float = DEFAULT_BUDGET
    estimate: bool = True  # run the self-check on the written file and record it (kvzip_cli.evaluation.estimate)

    @classmethod
    def from_preset(cls, preset: str = DEFAULT_PRESET, **options) -> "Settings":
        """`preset`'s settings with `options` (as `from_options` takes them) over it."""
        return cls.from_options(preset=preset, **options)

    @classmethod
    def from_options(cls, *, preset: str | None = None, codec: str | None = None, ratio: float | None = None,
                     scorer: str | None = None, allocation: str | None = None, bits: int | None = None,
                     quant: QuantOptions = QuantOptions(), chunk_size: int = DEFAULT_CHUNK,
                     target: Target | None = None, budget: float | None = None, refit: bool = True,
                     logit_bias: bool | None = None, estimate: bool = True) -> "Settings":
        """The options of `kvc compress` (None: not given), checked: a UsageError names the first that is wrong."""
        if logit_bias and not refit:
            raise UsageError("--logit-bias is fit with the refit: drop --no-refit")
        if target is not None:
            return cls._searched(target, budget, preset=preset, ratio=ratio, bits=bits, codec=codec, scorer=scorer,
                                 allocation=allocation, quant=quant, chunk_size=chunk_size, logit_bias=logit_bias,
                                 estimate=estimate)
        if budget is not None:
            raise UsageError("--budget bounds the search of --target-top1 / --target-kld: give a target too")
        chosen = get_preset(preset or DEFAULT_PRESET)
        record = preset_record(chosen, ratio=ratio, scorer=scorer, bits=bits, codec=codec, key_bits=quant.key_bits,
                               logit_bias=logit_bias)
        if logit_bias is None:
            logit_bias = chosen.logit_bias and default_logit_bias(allocation)
        bits = chosen.bits if bits is None else bits
        if codec is None:
            codec = chosen.codec if bits == chosen.bits else default_codec(bits)
        if quant.key_bits is None and bits == chosen.bits and chosen.key_bits is not None:
            quant = replace(quant, key_bits=chosen.key_bits)
        settings = cls(ratio=chosen.ratio if ratio is None else ratio, scorer=chosen.scorer if scorer is None else
                       scorer, allocation=allocation, bits=bits, codec=codec, quant=quant, refit=refit,
                       logit_bias=logit_bias, chunk_size=chunk_size, preset=chosen.name,
                       overrides=tuple(record["overrides"]), estimate=estimate)
        settings.check()
        return settings

    @classmethod
    def _searched(cls, target: Target, budget: float | None, *, preset, ratio, bits, codec, scorer, allocation,
                  quant: QuantOptions, chunk_size: int, logit_bias: bool | None, estimate: bool) -> "Settings":
        given = {"--preset": preset, "--ratio": ratio, "--bits": bits, "--codec": codec, "--key-bits": quant.key_bits}
        fixed = [name for name, value in given.items() if value is not None]
        if fixed:
            raise UsageError(f"a fidelity target chooses the ratio and bits itself: drop {', '.join(fixed)}")
        if logit_bias is not None:
            raise UsageError("--logit-bias / --no-logit-bias: a calibrated file (--target-top1 / --target-kld) is "
                             "not refit")
        target.check()
        budget = DEFAULT_BUDGET if budget is None else budget
        check_budget(budget)
        settings = cls(ratio=1.0, scorer=scorer or get_preset(DEFAULT_PRESET).scorer, allocation=allocation, bits=4,
                       codec="ans", quant=quant, refit=False, chunk_size=chunk_size, target=target, budget=budget,
                       estimate=estimate)
        settings.check()
        return settings

    def check(self) -> None:
        check_settings(self.codec, self.ratio, self.bits, self.chunk_size, self.scorer, self.allocation, self.quant)

    @property
    def key_bits(self) -> int | None:
        """Quantized files: the keys' bits; None for floats."""
        return (self.quant.key_bits or self.bits) if self.bits in QUANT_BITS else None

    @property
    def preset_fields(self) -> dict | None:
        """The header's record of the preset ({"preset", "overrides"}), None for a target's search."""
        return None if self.preset is None else {"preset": self.preset, "overrides": list(self.overrides)}

    def record(self) -> dict:
        """What every file made with these settings records in its header's `settings`, whatever the document (a
        corpus's manifest keeps it once)."""
        if self.target is not None:
            return {"chunk_size": self.chunk_size}
        return {"ratio": self.ratio, "bits": self.bits, "codec": self.codec, "chunk_size": self.chunk_size,
                **self.preset_fields}
