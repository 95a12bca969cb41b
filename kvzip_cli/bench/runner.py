"""Run a sweep on one document: prefill once, take the full cache's answers, then measure every setting."""

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors.torch
import torch
import zstandard

from ..attention import kvc_attention_in
from ..compress.prefilled import Prefilled, prefill_document
from ..compress.write import write_kvc
from ..evaluation.evaluator import CacheUnderTest, Evaluator, Reference
from ..evaluation.probes import Probe, builtin_probes, plant_needles
from ..load.loader import load
from ..models.loading import LoadedModel
from ..progress import TaskFactory, silent_task
from ..prune.scoring import Scored, score_context
from ..sizes import raw_fp16_bytes
from .peers import clear_masks, run_press
from .sweep import Setting


@dataclass
class BenchResult:
    document: str
    model: str
    tokens: int
    probes: list[Probe]
    needles: list[Probe]
    reference: Reference
    reference_answers: list[str]
    prefill_seconds: float
    habits: dict  # the full cache's answers: ends_full, repetition_full
    rows: list[dict]

    def as_json(self) -> dict:
        return {
            "document": self.document,
            "model": self.model,
            "tokens": self.tokens,
            "prefill_seconds": self.prefill_seconds,
            "needle_full": _fraction(self.reference.needle_hits),
            **self.habits,
            "probes": [
                {"kind": p.kind, "question": p.question, "full_cache_answer": a}
                for p, a in zip(self.probes, self.reference_answers, strict=True)
            ],
            "needles": [{"question": p.question, "key": p.expect} for p in self.needles],
            "rows": self.rows,
        }


def _fraction(hits: list[bool]) -> float:
    return sum(hits) / max(len(hits), 1)


def _row(setting: Setting, pre: Prefilled, **values) -> dict:
    """A setting's row; sizes against what the model's own cache holds (a sliding-window layer: its window)."""
    geometry = pre.geometry
    raw = raw_fp16_bytes(geometry.held_entries, geometry.head_dim)
    kept = values.pop("kept_ratio", setting.ratio)
    file_bytes = values.get("file_bytes")
    stored = file_bytes if file_bytes is not None else raw * kept  # a peer stores nothing: count kept fp16 entries
    elements = raw / 2 * kept  # kept keys and values
    row = {
        "setting": setting.label, "family": setting.family, "kind": setting.kind, "ratio": setting.ratio,
        "kept_ratio": kept, "bits": setting.bits, "codec": setting.codec, "kld": None, "top1": None,
        "delta_nll": None, "agreement": None, "ends": None, "repetition": None, "needle": None, "file_bytes": None,
        "raw_bytes": raw,
        "compression": raw / stored,
        "bits_per_element": 8 * file_bytes / elements if file_bytes else None,
        "compress_seconds": None, "prefill_seconds": pre.prefill_seconds, "load_seconds": None, "error": None,
        "scorer": setting.scorer, "allocation": setting.allocation, "score_seconds": None, "memory_ratio": None,
        "key_bits": setting.key_bits or setting.bits, "refit": setting.refit if setting.kind == "kvc" else None,
    }
    row.update(values)
    return row


def refitting_scorers(sweep: list[Setting]) -> set[str]:
    """The scorers some pruned kvc setting of `sweep` refits with: only their scoring records the reference queries
    (for a scorer other than KVzip, in reconstruction passes of their own, about two prefills)."""
    return {s.scorer for s in sweep if s.kind == "kvc" and s.ratio < 1 and s.refit != "off"}


def _measure_kvc(setting: Setting, pre: Prefilled, lm: LoadedModel, evaluator: Evaluator, reference: Reference,
                 workdir: Path, scored: dict[str, Scored], refitting: set[str], task: TaskFactory) -> dict:
    path = workdir / "bench.kvc"
    settings = setting.compress_settings()
    pruning = None
    if setting.ratio < 1:
        if setting.scorer not in scored:
            scored[setting.scorer] = score_context(lm, pre.cache, pre.layout, setting.scorer, task,
                                                   refit=setting.scorer in refitting)
        pruning = scored[setting.scorer].keep(setting.ratio, setting.allocation)
        if not settings.refit:
            pruning = replace(pruning, queries=None)
        pruning = replace(pruning, logit_bias=settings.logit_bias)
    made = write_kvc(pre, path, codec=settings.codec, bits=settings.bits, pruning=pruning, quant=settings.quant)
    with kvc_attention_in(lm.model):
        kv = load(path, lm)
        metrics = evaluator.evaluate(CacheUnderTest(kv.cache, pre.tokens), reference)
    path.unlink()
    extra = {}
    if pruning is not None:
        extra = {"kept_ratio": made.kept_ratio, "allocation": pruning.allocation, "score_seconds": made.score_seconds}
    return _row(setting, pre, **metrics, **extra, file_bytes=made.file_bytes, compress_seconds=made.seconds,
                load_seconds=kv.load_seconds, memory_ratio=kv.cache_bytes() / _own_cache_bytes(pre))


def _measure_peer(setting: Setting, pre: Prefilled, lm: LoadedModel, evaluator: Evaluator,
                  reference: Reference) -> dict:
    """A press that fails (kvpress raises on some models) gives a row with its error; the sweep goes on."""
    try:
        cache, kept, seconds = run_press(setting.peer, setting.ratio, lm, pre.layout.prefix_ids)
        metrics = evaluator.evaluate(CacheUnderTest(cache, pre.tokens), reference)
    except Exception as exc:  # noqa: BLE001 (third-party code; the row records what went wrong)
        return _row(setting, pre, error=f"{type(exc).__name__}: {exc}")
    finally:
        clear_masks(lm)
    return _row(setting, pre, **metrics, kept_ratio=kept, compress_seconds=seconds)


def _own_cache_bytes(pre: Prefilled) -> int:
    """Bytes of K/V the model's own cache holds of the context, in the dtype it computed (the prefill's cache also
    holds what sliding-window layers drop, for scoring)."""
    return 2 * pre.geometry.held_entries * pre.geometry.head_dim * pre.cache.layers[0].keys.element_size()


def _measure_size(setting: Setting, pre: Prefilled) -> dict:
    """The model's own cache as float16 safetensors (a sliding-window layer: its window), zstd-coded or not."""
    tensors = {}
    for i, layer in enumerate(pre.cache.layers):  # each holds what the model's own cache holds
        tensors[f"layer.{i}.keys"] = layer.keys[0].to(torch.float16).contiguous()
        tensors[f"layer.{i}.values"] = layer.values[0].to(torch.float16).contiguous()
    data = safetensors.torch.save(tensors)
    if setting.codec == "safetensors+zstd":
        data = zstandard.ZstdCompressor(level=3).compress(data)
    return _row(setting, pre, file_bytes=len(data))


def step_label(setting: Setting) -> str:
    """A setting as a progress step: its row name, with what a pruned or preset row keeps and stores."""
    if setting.kind == "kvc" and (setting.ratio < 1 or setting.label.startswith("preset ")):
        bits = f"{setting.bits}-bit" if setting.key_bits in (None, setting.bits) else (
            f"{setting.key_bits}-bit keys/{setting.bits}-bit values")
        scores = f", {setting.scorer} scores" if setting.ratio < 1 else ""
        return f"{setting.label} (kept {setting.ratio:g}, {bits} {setting.codec}{scores})"
    return setting.label


def run_bench(text: str, document: str, lm: LoadedModel, sweep: list[Setting], user_probes: list[Probe],
              task: TaskFactory = silent_task, new_tokens: int = 32) -> BenchResult:
    """Measure every setting of `sweep` on `text` (with needles planted) against its full cache."""
    planted, needles = plant_needles(text)
    probes = builtin_probes(text) + user_probes
    steps = ["prefill the document", f"full-cache reference answers ({len(probes)} probes)",
             *map(step_label, sweep)]
    advance = task("bench", len(steps), steps=steps)
    pre = prefill_document(planted, lm)
    advance(1)
    evaluator = Evaluator(lm, pre.layout, probes, needles, new_tokens)
    reference = evaluator.reference(CacheUnderTest(pre.cache, pre.tokens))
    advance(1)
    rows, scored, refitting = [], {}, refitting_scorers(sweep)
    habits = evaluator.habits(reference)
    with tempfile.TemporaryDirectory(prefix="kvc-bench-") as tmp:
        for setting in sweep:
            started = time.perf_counter()
            if setting.kind == "kvc":
                row = _measure_kvc(setting, pre, lm, evaluator, reference, Path(tmp), scored, refitting, task)
            elif setting.kind == "peer":
                row = _measure_peer(setting, pre, lm, evaluator, reference)
            else:
                row = _measure_size(setting, pre)
            rows.append({**row, "needle_full": _fraction(reference.needle_hits), **habits,
                         "bench_seconds": time.perf_counter() - started})
            advance(1)
    answers = [evaluator.answer_text(r) for r in reference.probes]
    return BenchResult(document, lm.name, pre.tokens, probes, needles, reference, answers, pre.prefill_seconds,
                       habits, rows)
