"""`kvc compress`: a document → its prefill → scores → a pruned, quantized `.kvc` file, under a preset's settings or
those a fidelity target's search chooses (kvzip_cli.calibrate)."""

import os
import time
from dataclasses import replace
from pathlib import Path

from .budget import check_ratio, protected_positions, visible_positions
from .cache_file import (
    DEFAULT_CHUNK,
    QUANT_BITS,
    CompressResult,
    QuantOptions,
    check_settings,
    default_codec,
    prefill_document,
    value_group,
    write_kvc,
)
from .calibrate import DEFAULT_BUDGET, Target, calibrate, check_budget
from .document import read_document
from .errors import UsageError
from .families import check_supported
from .model_files import EMBEDDED
from .models import LoadedModel, load_model
from .paths import check_output
from .presets import DEFAULT_PRESET, Preset, get_preset
from .progress import progress_bars
from .pruning import default_logit_bias, score_context
from .rope import head_dim


def preset_record(chosen: Preset, **given) -> dict:
    """What a file records of its preset: the preset's name and the options given that change it."""
    own = {"ratio": chosen.ratio, "scorer": chosen.scorer, "bits": chosen.bits, "codec": chosen.codec,
           "key_bits": chosen.key_bits, "logit_bias": chosen.logit_bias}
    changed = [_flag(name, value) for name, value in given.items() if value is not None and value != own[name]]
    return {"preset": chosen.name, "overrides": changed}


def compress_text(
    text: str,
    output: str | os.PathLike,
    *,
    model: str | LoadedModel = EMBEDDED,
    preset: str | None = None,
    codec: str | None = None,
    ratio: float | None = None,
    scorer: str | None = None,
    allocation: str | None = None,
    bits: int | None = None,
    quant: QuantOptions = QuantOptions(),
    chunk_size: int = DEFAULT_CHUNK,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
    target: Target | None = None,
    budget: float | None = None,
    refit: bool = True,
    logit_bias: bool | None = None,
) -> CompressResult:
    """Prefill `text` as a reusable prompt prefix and store its KV cache in `output`.

    `preset` ("lossless", "balanced", "small") sets ratio, scorer, bits and codec; any of them given here wins.
    With `ratio` < 1, `scorer` rates every entry without knowing any question and `allocation` ("global", "layer",
    "head" or "position"; default: the scorer's own) spreads the kept `ratio` of entries over layers and heads
    ("position": the same positions in all of them). `bits` 8, 4, 3 or 2 quantize (keys per channel, values per
    token), `codec` "ans" entropy-codes the quantized symbols. With `refit`, a pruned cache's kept values are refit so
    that attention over them gives what the full context gives to KVzip's reconstruction queries (kvzip_cli.refit);
    with `logit_bias` (default: on, except with the "position" allocation, whose files are for llama.cpp) the kept
    keys also get a fitted logit bias, stored in the file and added by kvc's attention.

    With a `target` (kvzip_cli.calibrate.Target), the ratio and bits are searched for instead: the smallest file
    whose self-check meets the target, within `budget` prefills of search time; `preset`, `ratio`, `bits`,
    `codec` and `quant.key_bits` must then be left unset, and the values are not refit (the self-check's
    reconstruction probes are close to the refit's own queries, so it would overrate refit candidates).
    """
    _check_bias(refit, logit_bias, target)
    if target is not None:
        return _calibrated(text, output, target, budget, model=model, scorer=scorer, allocation=allocation,
                           preset=preset, ratio=ratio, bits=bits, codec=codec, quant=quant, chunk_size=chunk_size,
                           device=device, dtype=dtype, progress=progress)
    ratio, scorer, bits, codec, quant, record, logit_bias = _settings(preset, codec, ratio, scorer, allocation, bits,
                                                                      quant, chunk_size, budget, logit_bias)
    check_output(Path(output))
    started = time.perf_counter()
    lm = _checked_model(model, device, dtype, quant if bits in QUANT_BITS else None)
    with progress_bars(progress) as task:
        pre = prefill_document(text, lm, chunk_size, task)
        pruning = None
        if ratio < 1:
            # before the costly scoring
            check_ratio(ratio, protected_positions(pre.layout), visible=visible_positions(pre.geometry))
            pruning = score_context(lm, pre.cache, pre.layout, scorer, task, refit).keep(ratio, allocation)
            pruning = replace(pruning, logit_bias=logit_bias)
        result = write_kvc(pre, output, codec=codec, bits=bits, pruning=pruning, quant=quant, task=task,
                           preset=record)
    return replace(result, seconds=time.perf_counter() - started)


def _flag(name: str, value) -> str:
    flag = f"--{name.replace('_', '-')}"
    return flag if value is not False else flag.replace("--", "--no-", 1)


def check_options(*, preset: str | None = None, codec: str | None = None, ratio: float | None = None,
                  scorer: str | None = None, allocation: str | None = None, bits: int | None = None,
                  quant: QuantOptions = QuantOptions(), chunk_size: int = DEFAULT_CHUNK, target: Target | None = None,
                  budget: float | None = None, refit: bool = True, logit_bias: bool | None = None, **_) -> dict:
    """Refuse (UsageError) the options `compress_text` would refuse, before any document or model (kvc compress on
    a corpus checks them once, not once per document). Returns settings a file made with them records (header
    `settings`): those the options fix, whatever the document."""
    _check_bias(refit, logit_bias, target)
    if target is not None:
        _calibrated_settings(target, budget, preset, ratio, bits, codec, scorer, allocation, quant, chunk_size)
        return {"chunk_size": chunk_size}
    ratio, _, bits, codec, _, record, _ = _settings(preset, codec, ratio, scorer, allocation, bits, quant,
                                                    chunk_size, budget, logit_bias)
    return {"ratio": ratio, "bits": bits, "codec": codec, "chunk_size": chunk_size, **record}


def _check_bias(refit: bool, logit_bias: bool | None, target: Target | None) -> None:
    if logit_bias and not refit:
        raise UsageError("--logit-bias is fit with the refit: drop --no-refit")
    if logit_bias is not None and target is not None:
        raise UsageError("--logit-bias / --no-logit-bias: a calibrated file (--target-top1 / --target-kld) is not "
                         "refit")


def _settings(preset, codec, ratio, scorer, allocation, bits, quant: QuantOptions, chunk_size: int, budget,
              logit_bias: bool | None):
    """A preset's settings with the options given over them, checked: (ratio, scorer, bits, codec, quant, record,
    logit_bias)."""
    if budget is not None:
        raise UsageError("--budget bounds the search of --target-top1 / --target-kld: give a target too")
    chosen = get_preset(preset or DEFAULT_PRESET)
    record = preset_record(chosen, ratio=ratio, scorer=scorer, bits=bits, codec=codec, key_bits=quant.key_bits,
                           logit_bias=logit_bias)
    if logit_bias is None:
        logit_bias = chosen.logit_bias and default_logit_bias(allocation)
    ratio = chosen.ratio if ratio is None else ratio
    scorer = chosen.scorer if scorer is None else scorer
    bits = chosen.bits if bits is None else bits
    if codec is None:
        codec = chosen.codec if bits == chosen.bits else default_codec(bits)
    if quant.key_bits is None and bits == chosen.bits and chosen.key_bits is not None:
        quant = replace(quant, key_bits=chosen.key_bits)
    check_settings(codec, ratio, bits, chunk_size, scorer, allocation, quant)
    return ratio, scorer, bits, codec, quant, record, logit_bias


def _calibrated_settings(target: Target, budget, preset, ratio, bits, codec, scorer, allocation, quant: QuantOptions,
                         chunk_size: int) -> tuple[float, str]:
    """A target search's settings, checked: (budget, scorer)."""
    chosen = {"--preset": preset, "--ratio": ratio, "--bits": bits, "--codec": codec, "--key-bits": quant.key_bits}
    given = [name for name, value in chosen.items() if value is not None]
    if given:
        raise UsageError(f"a fidelity target chooses the ratio and bits itself: drop {', '.join(given)}")
    target.check()
    budget = DEFAULT_BUDGET if budget is None else budget
    check_budget(budget)
    scorer = scorer or get_preset(DEFAULT_PRESET).scorer
    check_settings("ans", 1.0, 4, chunk_size, scorer, allocation, quant)
    return budget, scorer


def _calibrated(text: str, output: str | os.PathLike, target, budget: float | None, *, model, scorer, allocation,
                preset, ratio, bits, codec, quant: QuantOptions, chunk_size: int, device: str, dtype: str,
                progress: bool) -> CompressResult:
    budget, scorer = _calibrated_settings(target, budget, preset, ratio, bits, codec, scorer, allocation, quant,
                                          chunk_size)
    check_output(Path(output))
    started = time.perf_counter()
    lm = _checked_model(model, device, dtype, quant)
    with progress_bars(progress) as task:
        pre = prefill_document(text, lm, chunk_size, task)
        # Without the refit: the self-check's reconstruction probes are close to the queries the values would be fit
        # to, so it would overrate refit candidates.
        scored = score_context(lm, pre.cache, pre.layout, scorer, task, refit=False)
        _, result = calibrate(pre, scored, target, Path(output), budget=budget,
                              allocation=allocation, quant=quant, task=task)
    return replace(result, seconds=time.perf_counter() - started)


def _checked_model(model: str | LoadedModel, device: str, dtype: str, quant: QuantOptions | None) -> LoadedModel:
    """The model, loaded if named, refused if kvc cannot cache it, and with `quant` (a quantized write) its head
    size checked against --group: all before the costly prefill."""
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    check_supported(lm.model)  # before head_dim, which a state-space model lacks
    if quant is not None:
        value_group(quant, head_dim(lm.model))
    return lm


def compress(document: str | os.PathLike, output: str | os.PathLike, **options) -> CompressResult:
    """Like `kvc compress DOC -o OUTPUT`: `document` is a UTF-8 text file, or "-" for stdin."""
    return compress_text(read_document(os.fspath(document)), output, **options)
