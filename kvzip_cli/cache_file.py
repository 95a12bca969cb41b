"""The steps `kvc compress` and its calibrated search share: a document's chunked prefill (`prefill_document`, once)
and its cache written as a `.kvc` file under given settings (`write_kvc`, atomically, as often as asked)."""

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from kvc_format import CacheGeometry, KvcWriter, Stream, encode_positions
from kvc_format.quantized import Quantization, encode_layer

from . import __version__
from .attention import kvc_attention_in, observe_attention
from .budget import SINK_TOKENS, check_allocation, visible_positions
from .cache import context_geometry, context_kv
from .devices import DTYPE_NAMES
from .document import PromptLayout, layout_prompt
from .errors import KvcError, UsageError
from .families import check_supported
from .fingerprint import fingerprint
from .key_units import QueryEnergy, key_units
from .models import LoadedModel
from .paths import check_output
from .prefill import prefill
from .progress import TaskFactory, silent_task
from .pruning import Pruning
from .refit import Refit, refit_values
from .rope import inverse_frequencies, rope_tables, unrecordable_rope, unrotate
from .scorers import DEFAULT_SCORER, check_scorer
from .sizes import raw_fp16_bytes
from .tensors import storage_tensor, to_stream

CODECS = ("raw", "zstd", "ans")
FLOAT_BITS = (16, 32)
QUANT_BITS = (8, 4, 3, 2)
DEFAULT_CHUNK = 512
# Positions a document leaves free in the model's context: a question and a short answer, and KVzip's
# reconstruction passes (which run after the document, in chunks no shorter than PROMPT_ROOM).
ANSWER_ROOM = 128
# Quantization steps at 4 bits, as fractions of the key units (kvzip_cli.key_units: on average each head's key RMS)
# and of each value row's RMS; every bit added halves them. Chosen on the example corpus with one key step per head
# (examples/results/quantization/): 4 bits gave kld ≈ 0.005 at ≈ 3.6 bits per element once entropy-coded.
KEY_STEP_AT_4_BITS = 0.15
VALUE_STEP_AT_4_BITS = 0.3


def default_codec(bits: int) -> str:
    return "ans" if bits in QUANT_BITS else "zstd"


def key_step(bits: int) -> float:
    return KEY_STEP_AT_4_BITS * 2.0 ** (4 - bits)


def value_step(bits: int) -> float:
    return VALUE_STEP_AT_4_BITS * 2.0 ** (4 - bits)


@dataclass(frozen=True)
class QuantOptions:
    """Quantization knobs beyond `bits`: key precision in bits when it differs from the values' (keys carry most of
    the error), channels sharing one value step (None: the whole head), whether keys are stored with RoPE removed
    (None: when the model's RoPE can be undone) and whether key steps are weighted by the document's queries
    (kvzip_cli.key_units; False: one step per head, from its key RMS)."""

    key_bits: int | None = None
    value_group: int | None = None
    pre_rope: bool | None = None
    query_weighted_keys: bool = True


@dataclass(frozen=True)
class CompressResult:
    output: str
    model: str
    tokens: int
    kept_ratio: float
    raw_bytes: int  # what the model's own cache holds of the context in fp16 (sliding windows: their window only)
    file_bytes: int
    compression: float
    seconds: float
    prefill_seconds: float
    codec: str
    bits: int
    scorer: str | None = None  # None when nothing was pruned
    allocation: str | None = None
    score_seconds: float = 0.0
    key_bits: int | None = None  # quantized files: the keys' precision (may differ from `bits`, the values')
    calibration: dict | None = None  # --target-top1 / --target-kld: the search's outcome (kvzip_cli.calibrate)

    @property
    def bits_per_element(self) -> float:
        """File bits per kept K or V scalar (fp16 storage is 16)."""
        return 8 * self.file_bytes / (self.raw_bytes / 2 * self.kept_ratio)

    def as_json(self) -> dict:
        return {**asdict(self), "bits_per_element": self.bits_per_element}


def check_settings(codec: str, ratio: float, bits: int, chunk_size: int, scorer: str,
                   allocation: str | None, quant: QuantOptions = QuantOptions()) -> None:
    if codec not in CODECS:
        raise UsageError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
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


@dataclass
class Prefilled:
    """A document's KV cache as the model holds it (kvzip_cli.prefill: a sliding-window layer its window), computed
    once; `write_kvc` can store it under any number of settings."""

    lm: LoadedModel
    text: str
    layout: PromptLayout
    cache: DynamicCache
    identity: dict
    prefill_seconds: float
    chunk_size: int
    query_energy: np.ndarray | None = None  # (layers, heads, head_dim) mean q² over the prefill (key_units)

    @property
    def tokens(self) -> int:
        return len(self.layout.prefix_ids)

    @property
    def geometry(self) -> CacheGeometry:
        """The context as the model's own cache holds it: what a file stores at most (sliding windows included)."""
        return context_geometry(self.lm.model, self.tokens)


def prefill_document(text: str, lm: LoadedModel, chunk_size: int = DEFAULT_CHUNK,
                     task: TaskFactory = silent_task) -> Prefilled:
    """Lay `text` out as a prompt prefix and prefill it in chunks (KvcError for an architecture kvc cannot cache)."""
    check_supported(lm.model)
    layout = layout_prompt(lm.tokenizer, text)
    tokens = len(layout.prefix_ids)
    limit = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None)
    if limit and tokens + ANSWER_ROOM > limit:
        raise KvcError(f"the document is {tokens} tokens; model {lm.name!r} handles at most {limit} positions, "
                       f"{ANSWER_ROOM} of them kept for a question and its answer: shorten the document")
    identity = fingerprint(lm.model, lm.tokenizer)
    started = time.perf_counter()
    energy = QueryEnergy()
    with kvc_attention_in(lm.model), observe_attention(energy):
        cache = prefill(lm.model, layout.prefix_ids, chunk_size, task("prefill", tokens))
    return Prefilled(lm, text, layout, cache, identity, time.perf_counter() - started, chunk_size, energy.mean())


def _header(pre: Prefilled, bits: int, codec: str, pruning: Pruning | None, quant: dict | None,
            calibration: dict | None, preset: dict | None) -> dict:
    cache, identity, layout, held = pre.cache, pre.identity, pre.layout, pre.geometry
    layers, heads = len(cache.layers), identity["num_kv_heads"]
    geometry = {
        "layout": "quantized" if quant else "dense" if pruning is None else "pruned",
        "layers": layers,
        "kv_heads": heads,
        "tokens": pre.tokens,
        "head_dim": identity["head_dim"],
        "computed_dtype": DTYPE_NAMES[cache.layers[0].keys.dtype],
    }
    if held.windows is not None:  # a sliding-window layer stores only what a later token can see (SPEC.md §3)
        geometry["windows"] = list(held.windows)
    settings = {"ratio": 1.0, "kept_ratio": 1.0, "scorer": None, "allocation": None, "bits": bits, "codec": codec,
                "chunk_size": pre.chunk_size}
    if preset is not None:
        settings.update(preset)
    if pruning is not None:
        settings.update(ratio=pruning.ratio, kept_ratio=pruning.kept_ratio, scorer=pruning.scorer,
                        allocation=pruning.allocation, refit=_refit_setting(pruning))
    if pruning is not None or quant:
        geometry["kept"] = int(pruning.keep.sum()) if pruning is not None else held.held_entries
    if quant:
        geometry.update(exact_positions=quant["exact_positions"], key_rope=quant["key_rope"])
        if quant["rope_inv_freq"] is not None:
            geometry["rope_inv_freq"] = quant["rope_inv_freq"]
        settings.update({k: quant[k] for k in ("value_group", "value_step", "key_bits", "key_step", "key_units")})
    header = {
        "kvc": {"writer": f"kvc {__version__}"},
        "model": {**identity, "name": pre.lm.name, "dtype": DTYPE_NAMES[pre.lm.model.dtype]},
        "cache": geometry,
        "prompt": {
            "template": layout.template,
            "prefix_ids": layout.prefix_ids,
            "question_prefix": layout.question_prefix,
            "question_suffix": layout.question_suffix,
        },
        "document": {"chars": len(pre.text), "sha256": hashlib.sha256(pre.text.encode()).hexdigest()},
        "settings": settings,
        "timings": {"prefill_seconds": pre.prefill_seconds, "device": str(pre.lm.model.device)},
    }
    if calibration is not None:
        header["calibration"] = calibration
    return header


def _refit_setting(pruning: Pruning) -> str | None:
    if pruning.queries is None:
        return None
    return "values+bias" if pruning.logit_bias else "values"


def _kept_positions(keep: torch.Tensor) -> list[torch.Tensor]:
    return [row.nonzero().squeeze(-1) for row in keep.cpu()]


def _pruned_streams(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, bits: int) -> list[Stream]:
    """keys/values (kv_heads, tokens, head_dim), keep (kv_heads, tokens) → the kv_layer_pruned streams."""
    positions = _kept_positions(keep)
    counts, gaps = encode_positions([p.numpy() for p in positions])
    kept_keys = torch.cat([keys[h, p.to(keys.device)] for h, p in enumerate(positions)])
    kept_values = torch.cat([values[h, p.to(values.device)] for h, p in enumerate(positions)])
    return [
        Stream("counts", "int32", tuple(counts.shape), memoryview(counts).cast("B"), codec="zstd"),
        Stream("positions", "int32", tuple(gaps.shape), memoryview(gaps).cast("B"), codec="zstd"),
        to_stream("keys", storage_tensor(kept_keys, bits)),
        to_stream("values", storage_tensor(kept_values, bits)),
    ]


def value_group(options: QuantOptions, head_dim: int) -> int:
    group = min(options.value_group or head_dim, head_dim)
    if head_dim % group:
        raise KvcError(f"--group {group} must divide the model's head_dim ({head_dim})")
    return group


def _key_units(pre: Prefilled, rotary: int) -> np.ndarray | None:
    """(layers, kv_heads, head_dim) query-weighted key steps at key_step 1, or None (per-head RMS steps)."""
    if pre.query_energy is None:
        return None
    # RoPE rotates channel pairs, so it leaves each head's key RMS unchanged: the stored keys' RMS either way (over
    # what each layer holds: a sliding-window layer its window).
    rms = torch.stack([layer.keys[0].float().pow(2).mean((1, 2)).sqrt() for layer in pre.cache.layers])
    return key_units(pre.query_energy, rms.double().cpu().numpy(), rotary)


def _quantizer(pre: Prefilled, bits: int, codec: str, options: QuantOptions):
    """(Quantization, RoPE tables or None, header fields, per-layer key units or None) for a quantized write."""
    tables, inv_freq = None, None
    if options.pre_rope is not False:
        tables = rope_tables(pre.lm.model, torch.arange(pre.tokens))
        inv_freq = inverse_frequencies(pre.lm.model, *tables) if tables is not None else None
        tables = tables if inv_freq is not None else None
        if tables is None and options.pre_rope:
            raise KvcError(f"--pre-rope: model {pre.lm.name!r} {unrecordable_rope(pre.lm.model)}; use --no-pre-rope")
    head_dim = pre.identity["head_dim"]
    group = value_group(options, head_dim)
    key_bits = options.key_bits or bits
    quant = Quantization(value_mode="uniform", value_step=value_step(bits), value_group=group,
                         key_step=key_step(key_bits), exact_positions=SINK_TOKENS,
                         coder="rans" if codec == "ans" else codec)
    rotary = tables[0].shape[-1] if tables is not None else 0  # channels stored with RoPE removed
    units = _key_units(pre, rotary) if options.query_weighted_keys else None
    fields = {"exact_positions": SINK_TOKENS, "key_rope": "removed" if tables is not None else "applied",
              "rope_inv_freq": inv_freq, "value_group": group, "value_step": quant.value_step, "key_bits": key_bits,
              "key_step": quant.key_step, "key_units": "query" if units is not None else "rms"}
    return quant, tables, fields, units


def _kept_rows(cache: torch.Tensor, positions: list[torch.Tensor]) -> np.ndarray:
    """cache (kv_heads, tokens, head_dim) → (kept, head_dim) float32, the kept rows in head order."""
    return torch.cat([cache[h, p] for h, p in enumerate(positions)]).float().numpy()


def _quantized_layer(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, quant: Quantization,
                     tables: tuple[torch.Tensor, torch.Tensor] | None, key_unit: np.ndarray | None):
    """keys/values (kv_heads, tokens, head_dim) → the kv_layer_quantized streams and section attributes."""
    keys, values = keys.float().cpu(), values.float().cpu()
    if tables is not None:
        keys = unrotate(keys, *(t.cpu() for t in tables))
    positions = _kept_positions(keep)
    try:
        return encode_layer(_kept_rows(keys, positions), _kept_rows(values, positions),
                            [p.numpy() for p in positions], quant, key_unit)
    except ValueError as exc:
        raise KvcError(f"cannot quantize this cache: {exc}") from None


def _refitter(pre: Prefilled, pruning: Pruning | None):
    """refit(layer, keys, values) → the layer's `Refit` (kvzip_cli.refit: values with the kept rows refit, and the
    kept keys' logit bias when `pruning.logit_bias`), or None for a layer left as it is; the refitter itself is None
    when nothing is refit: no pruning, or a pruning without reference queries. The fit reads the computed keys, also
    for a quantized file: fitting to the keys as quantized was measured and gained nothing (README, "Refit"). A
    sliding-window layer is fit over the positions it holds, each query over what its window sees."""
    if pruning is None or pruning.queries is None:
        return None
    config = pre.lm.model.config.get_text_config()
    softcap = getattr(config, "attn_logit_softcapping", None)
    geometry = pre.geometry

    def refit(i: int, keys: torch.Tensor, values: torch.Tensor) -> Refit | None:
        queries = pruning.queries.layer(i)
        if queries is None:
            return None
        keep, scaling = pruning.keep[i].to(keys.device), pruning.queries.scaling[i]
        width = geometry.windows[i] if geometry.windows is not None else None
        if width is None:
            return refit_values(keys, values, keep, queries, scaling, softcap, logit_bias=pruning.logit_bias)
        first = geometry.first_position(i)
        window = (pruning.queries.positions(i) - first, width)
        fitted = refit_values(keys[:, first:], values[:, first:], keep[:, first:], queries, scaling, softcap,
                              logit_bias=pruning.logit_bias, window=window)
        refit_all = values.float().clone()
        refit_all[:, first:] = fitted.values
        return Refit(refit_all, fitted.bias)

    return refit


def _bias_stream(bias: list[torch.Tensor]) -> list[Stream]:
    """Per head (kept_h,) → the kv_layer_bias stream: float16, the kept rows in head order, as the keys."""
    data = torch.cat(bias).to(torch.float16).cpu().numpy()
    return [Stream("bias", "float16", data.shape, memoryview(data).cast("B"), codec="zstd")]


def write_kvc(pre: Prefilled, output: str | os.PathLike, *, codec: str = "zstd", bits: int = 16,
              pruning: Pruning | None = None, quant: QuantOptions = QuantOptions(),
              task: TaskFactory = silent_task, calibration: dict | None = None,
              preset: dict | None = None) -> CompressResult:
    """Store a prefilled cache in `output` (atomically), pruned to `pruning.keep` when given, quantized to `bits`
    when bits is 8, 4, 3 or 2. `calibration` (kvzip_cli.calibrate) is recorded in the header when given, and
    `preset` ({"preset": name, "overrides": [option, ...]}, from `preset_record`) in its settings.

    `seconds` counts the prefill, the scoring and the write.
    """
    output = Path(output)
    check_output(output)
    check_settings(codec, pruning.ratio if pruning else 1.0, bits, pre.chunk_size, DEFAULT_SCORER, None, quant)
    started = time.perf_counter()
    cache, identity = pre.cache, pre.identity
    computed = cache.layers[0].keys.dtype
    if bits == 32 and computed != torch.float32:
        raise KvcError(f"--bits 32 keeps float32 KV, but the model computed {DTYPE_NAMES[computed]}; "
                       "use --bits 16 or --dtype float32")
    quantizer, tables, fields, units = (_quantizer(pre, bits, codec, quant) if bits in QUANT_BITS
                                        else (None, None, None, None))
    refit = _refitter(pre, pruning)
    geometry = pre.geometry
    visible = visible_positions(geometry)
    advance = task("write" if refit is None else "refit and write", len(cache.layers))
    with KvcWriter(output, _header(pre, bits, codec, pruning, fields, calibration, preset)) as writer:
        for i, layer in enumerate(cache.layers):
            keys, values = context_kv(layer, pre.tokens)
            unit = units[i] if units is not None else None
            fitted = refit(i, keys, values) if refit is not None else None
            if fitted is not None:
                values = fitted.values.to(values.dtype)
            if quantizer is not None:
                keep = pruning.keep[i] if pruning is not None else visible[i].expand(keys.shape[:2])
                encoded = _quantized_layer(keys, values, keep, quantizer, tables, unit)
                writer.add_section("kv_layer_quantized", {"layer": i, **encoded.attrs}, encoded.streams,
                                   codec="zstd")
            elif pruning is None:
                first = geometry.first_position(i)  # a sliding-window layer: its window only
                streams = [to_stream("keys", storage_tensor(keys[:, first:], bits)),
                           to_stream("values", storage_tensor(values[:, first:], bits))]
                writer.add_section("kv_layer", {"layer": i}, streams, codec=codec)
            else:
                kept = int(pruning.keep[i].sum())
                streams = _pruned_streams(keys, values, pruning.keep[i], bits)
                writer.add_section("kv_layer_pruned", {"layer": i, "kept": kept}, streams, codec=codec)
            if fitted is not None and fitted.bias is not None:
                writer.add_section("kv_layer_bias", {"layer": i}, _bias_stream(fitted.bias), codec="zstd")
            advance(1)
    file_bytes = output.stat().st_size
    raw = raw_fp16_bytes(geometry.held_entries, identity["head_dim"])
    score_seconds = pruning.score_seconds if pruning else 0.0
    return CompressResult(
        output=str(output),
        model=pre.lm.name,
        tokens=pre.tokens,
        kept_ratio=pruning.kept_ratio if pruning else 1.0,
        raw_bytes=raw,
        file_bytes=file_bytes,
        compression=raw / file_bytes,
        seconds=pre.prefill_seconds + score_seconds + time.perf_counter() - started,
        prefill_seconds=pre.prefill_seconds,
        codec=codec,
        bits=bits,
        scorer=pruning.scorer if pruning else None,
        allocation=pruning.allocation if pruning else None,
        score_seconds=score_seconds,
        key_bits=fields["key_bits"] if fields else None,
        calibration=calibration,
    )
