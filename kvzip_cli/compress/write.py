"""A prefilled cache written as a `.kvc` file under given settings (`write_kvc`, atomically, as often as asked):
the header, then one section per layer (dense, pruned or quantized) and the pruned layers' logit biases."""

import hashlib
import os
import time
from pathlib import Path

import torch

from kvc_format import KvcWriter, Stream, encode_positions

from .. import __version__
from ..context import context_kv
from ..devices import DTYPE_NAMES
from ..errors import KvcError
from ..paths import check_output
from ..progress import TaskFactory, silent_task
from ..prune.budget import visible_positions
from ..prune.refit import Refit, refit_values
from ..prune.scorers import DEFAULT_SCORER
from ..prune.scoring import Pruning
from ..sizes import raw_fp16_bytes
from ..tensors import storage_tensor, to_stream
from .prefilled import Prefilled
from .quantize import kept_positions, layer_quantizer
from .result import CompressResult
from .settings import QUANT_BITS, QuantOptions, check_settings


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
        "document": {"chars": len(pre.text), "sha256": hashlib.sha256(pre.text.encode()).hexdigest(),
                     "name": pre.source},
        "settings": settings,
        "timings": {"prefill_seconds": pre.prefill_seconds, "device": str(pre.lm.model.device)},
    }
    if calibration is not None:  # its chosen candidate's self-check is the file's loss estimate
        header["calibration"] = calibration
        header["estimate"] = {**calibration["self_check"], "method": "self-check"}
    return header


def _refit_setting(pruning: Pruning) -> str | None:
    if pruning.queries is None:
        return None
    return "values+bias" if pruning.logit_bias else "values"


def _pruned_streams(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, bits: int) -> list[Stream]:
    """keys/values (kv_heads, tokens, head_dim), keep (kv_heads, tokens) → the kv_layer_pruned streams."""
    positions = kept_positions(keep)
    counts, gaps = encode_positions([p.numpy() for p in positions])
    kept_keys = torch.cat([keys[h, p.to(keys.device)] for h, p in enumerate(positions)])
    kept_values = torch.cat([values[h, p.to(values.device)] for h, p in enumerate(positions)])
    return [
        Stream("counts", "int32", tuple(counts.shape), memoryview(counts).cast("B"), codec="zstd"),
        Stream("positions", "int32", tuple(gaps.shape), memoryview(gaps).cast("B"), codec="zstd"),
        to_stream("keys", storage_tensor(kept_keys, bits)),
        to_stream("values", storage_tensor(kept_values, bits)),
    ]


def _refitter(pre: Prefilled, pruning: Pruning | None):
    """refit(layer, keys, values) → the layer's `Refit` (kvzip_cli.prune.refit: values with the kept rows refit, and the
    kept keys' logit bias when `pruning.logit_bias`), or None for a layer left as it is; the refitter itself is None
    when nothing is refit: no pruning, or a pruning without reference queries. The fit reads the computed keys, also
    for a quantized file: fitting to the keys as quantized was measured and gained nothing (docs/pruning.md, "Refit"). A
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
    when bits is 8, 4, 3 or 2. `calibration` (kvzip_cli.compress.calibrate) is recorded in the header when given, and
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
    quantizer = layer_quantizer(pre, bits, codec, quant) if bits in QUANT_BITS else None
    fields = quantizer.fields if quantizer is not None else None
    refit = _refitter(pre, pruning)
    geometry = pre.geometry
    visible = visible_positions(geometry)
    advance = task("write" if refit is None else "refit and write", len(cache.layers))
    header = _header(pre, bits, codec, pruning, fields, calibration, preset)
    with KvcWriter(output, header) as writer:
        for i, layer in enumerate(cache.layers):
            keys, values = context_kv(layer, pre.tokens)
            fitted = refit(i, keys, values) if refit is not None else None
            if fitted is not None:
                values = fitted.values.to(values.dtype)
            if quantizer is not None:
                keep = pruning.keep[i] if pruning is not None else visible[i].expand(keys.shape[:2])
                encoded = quantizer.encode(i, keys, values, keep)
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
        estimate=header.get("estimate"),
    )
