"""`kvc compress`: a document → its prefill → scores → a pruned, quantized `.kvc` file under `Settings` (a preset's,
or those a fidelity target's search chooses: kvzip_cli.compress.calibrate), with the file's loss estimate in its
header."""

import contextlib
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from kvc_format import KvcReader, rewrite_header

from ..document import read_document
from ..errors import UsageError
from ..evaluation.estimate import estimate_loss
from ..models.families import check_supported
from ..models.files import EMBEDDED
from ..models.loading import LoadedModel, load_model
from ..paths import check_output
from ..progress import TaskFactory, progress_bars
from ..prune.budget import check_ratio, protected_positions, visible_positions
from ..prune.scoring import score_context
from ..rope import head_dim
from .calibrate import calibrate
from .prefilled import Prefilled, prefill_document
from .quantize import value_group
from .result import CompressResult
from .settings import QUANT_BITS, Settings
from .write import write_kvc


def compress_text(text: str, output: str | os.PathLike, *, model: str | LoadedModel = EMBEDDED,
                  settings: Settings | None = None, device: str = "auto", dtype: str = "auto",
                  progress: bool = False, task: TaskFactory | None = None, source: str | None = None,
                  **options) -> CompressResult:
    """Prefill `text` as a reusable prompt prefix and store its KV cache in `output` (atomically).

    `settings` (kvzip_cli.compress.settings.Settings, default: the balanced preset) say what is kept and how it is
    stored; instead of them, the options of `Settings.from_options` may be given here (`preset="small"`,
    `ratio=0.2`, `bits=4`, ...). With `ratio` < 1, the scorer rates every entry without knowing any question and
    the allocation spreads the kept entries over layers and heads; the kept values are refit (and given a logit
    bias) so that attention over them gives what the full context gives; `bits` 8, 4, 3 or 2 quantize and codec
    "ans" entropy-codes the symbols. With a target, the ratio and bits are searched for instead. Unless
    `settings.estimate` is off, the written file is loaded back and self-checked, and the header records the
    estimate (kvzip_cli.evaluation.estimate). `source` names the document in the header (kvc inspect shows it).
    `task` reports the phases to a caller's own display (a corpus run's) instead of `progress`'s bars or lines.
    """
    if settings is None:
        settings = Settings.from_options(**options)
    elif options:
        raise UsageError(f"give settings or options, not both: {', '.join(sorted(options))}")
    output = Path(output)
    check_output(output)
    started = time.perf_counter()
    lm = _checked_model(model, device, dtype, settings)
    with (progress_bars(progress) if task is None else contextlib.nullcontext(task)) as task:
        pre = prefill_document(text, lm, settings.chunk_size, task, source)
        if settings.target is not None:
            result = _calibrated(pre, settings, output, task)
        else:
            result = _estimated(pre, settings, output, task)
    return replace(result, seconds=time.perf_counter() - started)


def _write(pre: Prefilled, settings: Settings, output: Path, task: TaskFactory) -> CompressResult:
    pruning = None
    if settings.ratio < 1:
        # before the costly scoring
        check_ratio(settings.ratio, protected_positions(pre.layout), visible=visible_positions(pre.geometry))
        pruning = score_context(pre.lm, pre.cache, pre.layout, settings.scorer, task, settings.refit)
        pruning = replace(pruning.keep(settings.ratio, settings.allocation), logit_bias=settings.logit_bias)
    return write_kvc(pre, output, codec=settings.codec, bits=settings.bits, pruning=pruning, quant=settings.quant,
                     task=task, preset=settings.preset_fields)


def _estimated(pre: Prefilled, settings: Settings, output: Path, task: TaskFactory) -> CompressResult:
    """The file written, and with `settings.estimate` its loss estimate measured on it and added to its header. The
    file to measure is written in the system's temporary folder, so that the folder of `output` only ever sees the
    finished file (`output` is then written atomically, as every file is)."""
    if not settings.estimate:
        return _write(pre, settings, output, task)
    with tempfile.TemporaryDirectory(prefix="kvc-compress-") as tmp:
        written = Path(tmp) / "written.kvc"
        result = _write(pre, settings, written, task)
        advance = task("estimate", 1)
        started = time.perf_counter()
        estimate = estimate_loss(pre, written)
        with KvcReader(written) as reader:
            timings = {**reader.header["timings"], "estimate_seconds": round(time.perf_counter() - started, 3)}
            header = {**reader.header, "estimate": estimate, "timings": timings}
        rewrite_header(written, output, header)
        advance(1)
    file_bytes = output.stat().st_size
    return replace(result, output=str(output), file_bytes=file_bytes, compression=result.raw_bytes / file_bytes,
                   estimate=estimate)


def _calibrated(pre: Prefilled, settings: Settings, output: Path, task: TaskFactory) -> CompressResult:
    # Without the refit: the self-check's reconstruction probes are close to the queries the values would be fit
    # to, so it would overrate refit candidates.
    scored = score_context(pre.lm, pre.cache, pre.layout, settings.scorer, task, refit=False)
    _, result = calibrate(pre, scored, settings.target, output, budget=settings.budget,
                          allocation=settings.allocation, quant=settings.quant, task=task)
    return result


def _checked_model(model: str | LoadedModel, device: str, dtype: str, settings: Settings) -> LoadedModel:
    """The model, loaded if named, refused if kvc cannot cache it, and for a quantized write its head size checked
    against the value group: all before the costly prefill."""
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
    check_supported(lm.model)  # before head_dim, which a state-space model lacks
    if settings.bits in QUANT_BITS or settings.target is not None:
        value_group(settings.quant, head_dim(lm.model))
    return lm


def compress(document: str | os.PathLike, output: str | os.PathLike, **options) -> CompressResult:
    """Like `kvc compress DOC -o OUTPUT`: `document` is a UTF-8 text file, or "-" for stdin; `options` as
    `compress_text` takes them."""
    source = os.fspath(document)
    return compress_text(read_document(source), output, source=options.pop("source", source), **options)
