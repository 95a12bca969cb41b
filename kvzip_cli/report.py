"""What a `.kvc` file holds, in figures and in words: `inspect(path)` reads its header and index (no model, no
torch) into a `FileReport`; `kvc inspect` prints its `lines()`, `--json` its `as_json()`."""

import os
from dataclasses import dataclass

from kvc_format import KvcReader

from .sizes import raw_fp16_bytes


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def chosen_text(calibration: dict) -> str:
    c = calibration["chosen"]
    bits = "16-bit" if c["bits"] == 16 else f"{c['key_bits']}-bit keys, {c['bits']}-bit values"
    return f"ratio {c['ratio']:g}, {bits}"


def self_check_text(check: dict) -> str:
    return f"top1 {check['top1']:.3f}, kld {check['kld']:.4f} ({check['probes']} probes)"


def calibration_text(calibration: dict) -> str:
    target = ", ".join(f"{'top1 >=' if k == 'top1' else 'kld <='} {v:g}" for k, v in calibration["target"].items())
    cost = calibration.get("search_prefills")
    cost = f", {cost:.1f} prefills" if cost is not None else ""
    budget = "; budget spent" if calibration.get("budget_exhausted") else ""
    return (f"target {target} {'met' if calibration['met'] else 'NOT met'}: self-check "
            f"{self_check_text(calibration['self_check'])} at {chosen_text(calibration)}; {calibration['trials']} "
            f"trials in {calibration['search_seconds']:.1f} s{cost}{budget}")


def estimate_text(estimate: dict | None) -> str:
    """A file's loss estimate in words (kvzip_cli.evaluation.estimate)."""
    if estimate is None:
        return "none recorded (made with --no-estimate, or by kvc before 0.7)"
    if not estimate.get("probes"):
        return f"none: {estimate.get('note', 'no probe could be made of the document')}"
    return (f"top1 {estimate['top1']:.3f}, kld {estimate['kld']:.4f} against the full cache on the self-check's "
            f"{estimate['probes']} probes ({estimate['positions']} positions; query-agnostic: passages of the "
            "document repeated and asked about)")


def preset_text(settings: dict, calibration) -> str:
    if isinstance(calibration, dict):
        return "none: the settings were searched for a fidelity target (calibrated, below)"
    if "preset" not in settings:
        return "not recorded (a file written before kvc recorded presets)"
    changed = settings.get("overrides") or []
    return settings["preset"] + (f", changed by {' '.join(changed)}" if changed else "")


def settings_text(settings: dict, cache: dict) -> str:
    """The compression settings in words: what was kept, at what precision, with which codec."""
    if settings.get("scorer"):
        kept = (f"{settings['kept_ratio']:.1%} of entries kept (ratio {settings['ratio']:g}, {settings['scorer']} "
                f"scores, {settings['allocation']} allocation)")
        kept += {"values": ", values refit", "values+bias": ", values refit with a logit bias per entry"}.get(
            settings.get("refit"), "")
    else:
        kept = "every entry kept"
    bits = settings.get("bits")
    if bits in (16, 32):
        precision = f"{bits}-bit floats"
    else:
        rope = ", RoPE removed" if cache.get("key_rope") == "removed" else ""
        group = settings.get("value_group")
        precision = (f"keys {settings.get('key_bits') or bits}-bit{rope}, values {bits}-bit"
                     + (f" in groups of {group}" if group else ""))
    return f"{kept}; {precision}; codec {settings.get('codec')}; prefilled in chunks of {settings.get('chunk_size')}"


@dataclass(frozen=True)
class FileReport:
    """A `.kvc` file's report: `info` holds what `kvc inspect --json` prints (its keys: docs/json.md)."""

    info: dict

    def as_json(self) -> dict:
        return self.info

    def lines(self) -> list[str]:
        info = self.info
        fp, cache = info["fingerprint"], info["cache"]
        out = [f"{info['file']}  (.kvc {info['version']}, written by {info['writer']})"]
        if info["document"].get("name"):
            out.append(f"  document     {info['document']['name']} ({info['document'].get('chars', 0):,} characters)")
        out.append(f"  model        {info['model']} ({fp.get('architecture')}, {fp.get('num_layers')} layers, "
                   f"{fp.get('num_kv_heads')} KV heads x {fp.get('head_dim')})")
        out.append(f"  weights      sha256 {str(fp.get('weight_digest'))[:16]}...  tokenizer "
                   f"{str(fp.get('tokenizer_digest'))[:16]}...")
        out.append(f"  tokens       {info['tokens']:,} ({info['prompt'].get('template')} template), "
                   f"KV computed in {cache.get('computed_dtype')}, layout {cache['layout']}")
        sliding = [entry for entry in info["layers"] if entry["window"]]
        if sliding:
            widths = ", ".join(sorted({str(entry["window"]) for entry in sliding}))
            out.append(f"  windows      {len(sliding)} of {len(info['layers'])} layers slide (window {widths}): each "
                       f"stores only the {min(e['positions'] for e in sliding):,} positions a later token sees")
        out.append(f"  preset       {preset_text(info['settings'], info['calibration'])}")
        out.append(f"  settings     {settings_text(info['settings'], cache)}")
        out.append(f"  size         {mb(info['file_bytes'])} for {mb(info['raw_bytes'])} of fp16 KV in the model's "
                   f"cache ({info['raw_bytes'] / info['file_bytes']:.2f}x), {info['bits_per_element']:.2f} bits per "
                   "kept element")
        out.append("  streams      " + ", ".join(f"{name} {e['bits_per_element']:.2f} ({'/'.join(e['codecs'])})"
                                                for name, e in info["streams"].items()))
        out.append(f"  loss         {estimate_text(info['estimate'])}")
        if info["timings"].get("prefill_seconds") is not None:
            out.append(f"  prefill      {info['timings']['prefill_seconds']:.2f} s on {info['timings'].get('device')}")
        if isinstance(info["calibration"], dict):
            out.append(f"  calibrated   {calibration_text(info['calibration'])}")
        sizes = [entry["bytes"] for entry in info["layers"]]
        out.append(f"  sections     {len(sizes)} layers, {min(sizes):,}..{max(sizes):,} bytes each")
        kept = [entry["kept_ratio"] for entry in info["layers"]]
        out.append(f"  kept         {info['kept_ratio']:.1%} of entries; per layer {min(kept):.1%}..{max(kept):.1%}")
        if info["kept_ratio"] < 1:
            out.append("  per layer    " + " ".join(f"{k:.0%}" for k in kept))
        return out


def report(reader: KvcReader) -> FileReport:
    """The report of an open file."""
    header = reader.header
    g = reader.geometry
    kept = reader.kept_per_layer()
    elements = 2 * sum(kept) * g.head_dim  # kept keys and values
    streams: dict[str, dict] = {}
    for section in reader.sections:
        for st in section.streams:
            entry = streams.setdefault(st.name, {"bytes": 0, "codecs": set()})
            entry["bytes"] += st.length
            entry["codecs"].add(st.codec)
    return FileReport({
        "file": reader.path,
        "version": f"{reader.version[0]}.{reader.version[1]}",
        "model": header["model"].get("name"),
        "fingerprint": header["model"],
        "document": header.get("document", {}),
        "tokens": g.tokens,
        "kept_ratio": sum(kept) / g.held_entries,  # of what the model's own (windowed) cache holds
        "file_bytes": reader.file_size,
        "raw_bytes": raw_fp16_bytes(g.held_entries, g.head_dim),
        "cache": header["cache"],
        "settings": header.get("settings", {}),
        "prompt": {k: v for k, v in header["prompt"].items() if k != "prefix_ids"},
        "timings": header.get("timings", {}),
        "calibration": header.get("calibration"),
        "estimate": header.get("estimate"),
        "writer": header.get("kvc", {}).get("writer"),
        "bits_per_element": 8 * reader.file_size / elements,
        "streams": {name: {"bytes": e["bytes"], "bits_per_element": 8 * e["bytes"] / elements,
                           "codecs": sorted(e["codecs"])} for name, e in streams.items()},
        "layers": [{"layer": i, "bytes": n, "kept_ratio": k / (g.kv_heads * g.held(i)), "window": window,
                    "positions": g.held(i)}
                   for i, (n, k, window) in enumerate(zip(reader.section_sizes(), kept, g.windows or [None] * g.layers,
                                                          strict=True))],
    })


def inspect(path: str | os.PathLike) -> FileReport:
    """The report of the `.kvc` file at `path` (KvcFormatError for a file that is not one)."""
    with KvcReader(path) as reader:
        return report(reader)
