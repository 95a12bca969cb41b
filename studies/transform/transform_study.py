"""Transform coding and other step allocations measured against today's quantizer, on the bench documents, in
one run: can a kept entry cost fewer bits at the same error?

Every method reconstructs the same kept entries (KVzip scores, refit values) and is judged like `kvc bench`: kld and
top1 teacher-forced against the full cache over the bench's probes. Sizes are what the format would store: the
symbols through kvc's own rANS coder (tables and lane states included), key zero points and steps, value row
steps, sink rows, kept positions and, for the transforms, their bases. Methods:

- scalar: today's quantizer (keys per (head, channel), steps weighted by the queries' energy, RoPE removed; values
  per row, steps ∝ the row's RMS), at 0.7×, 1× and 1.4× the 3-bit steps.
- klt-free / klt-8: keys coded in their own KLT basis (the PCA of each head's query-weighted keys), the same step in
  every component, so components whose coefficients all round to zero cost nothing. "free" does not count the
  basis (the coding gain's ceiling); "8" stores it as int8 and counts it.
- fisher: the steps allocated by the empirical Fisher information of the cache (squared gradients of the model's
  reconstruction loss on 16 query-agnostic "repeat the text" probes): per (layer, head, channel) for keys, per row
  for values, step ∝ Fisher^-1/2 (the high-rate optimum), within 20× of the geometric mean.
- score: value rows get steps ∝ (KVzip score)^-1/2 in place of today's ∝ RMS, at the same geometric mean (one
  allocation over entries by importance alone).

    python studies/transform/transform_study.py [--out DIR] [DOC ...]

About 8 minutes per document on 2 CPU cores; writes DIR/<doc>.json, DIR/summary.md and DIR/study.png (DIR:
results/ beside this script by default).
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from kvc_format import encode_positions
from kvzip_cli.attention import kvc_attention_in
from kvzip_cli.bench.report import require_matplotlib
from kvzip_cli.compress.key_units import key_units
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.quantize import key_step, value_step
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.document import question_ids, read_document
from kvzip_cli.evaluation.evaluator import CacheUnderTest, Evaluator
from kvzip_cli.evaluation.probes import builtin_probes, plant_needles
from kvzip_cli.evaluation.self_check import quotes
from kvzip_cli.load.loader import load
from kvzip_cli.load.pruned_cache import PrunedCache, PrunedLayer
from kvzip_cli.models.loading import load_model
from kvzip_cli.prune.budget import SINK_TOKENS
from kvzip_cli.prune.refit import refit_values
from kvzip_cli.prune.scoring import score_context
from kvzip_cli.rope import rope_tables, rotate, unrotate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # studies/: the harness shared with logit-bias
from quantizer_harness import BENCH_DOCS, coded_bytes, finish_plot, row_values, scalar_keys, zstd_bytes  # noqa: E402

HERE = Path(__file__).resolve().parent
FISHER_PROBES, FISHER_TOKENS, FISHER_RANGE = 16, 48, np.log(20.0)
# (method, kept ratio, step multiplier of the 3-bit steps)
SETTINGS = [("scalar", 0.3, m) for m in (0.7, 1.0, 1.4)] + [
    ("klt-free", 0.3, 1.0), ("klt-free", 0.3, 1.4), ("klt-8", 0.3, 1.0), ("klt-8", 0.3, 1.4),
    ("fisher", 0.3, 1.0), ("fisher", 0.3, 1.5), ("score", 0.3, 1.0), ("score", 0.3, 1.3),
] + [("scalar", 1.0, m) for m in (0.7, 1.0, 1.4)] + [("klt-8", 1.0, 1.0), ("klt-8", 1.0, 1.3)]


@dataclass
class Head:
    layer: int
    head: int
    rows: torch.Tensor  # kept positions past the sinks
    keys: np.ndarray  # (rows, head_dim) float64, RoPE removed
    values: np.ndarray  # (rows, head_dim) float64, refit
    unit: np.ndarray  # (head_dim,) today's key step at key_step 1
    scores: np.ndarray  # (rows,) KVzip
    fisher_keys: np.ndarray  # (head_dim,) mean squared gradient per channel (RoPE pairs shared)
    fisher_values: np.ndarray  # (rows,) squared gradient summed over the row


def fisher(lm, pre, tables) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer (kv_heads, tokens, head_dim): squared gradients of the reconstruction loss over the probes, keys
    in the RoPE-removed frame."""
    keys = [layer.keys.detach().clone().requires_grad_(True) for layer in pre.cache.layers]
    values = [layer.values.detach().clone().requires_grad_(True) for layer in pre.cache.layers]
    squared = [torch.zeros_like(t[0]) for t in keys + values]
    layout, tokenizer = pre.layout, lm.tokenizer
    for quote, follows in quotes(pre.text, FISHER_PROBES, 0.25, 8):
        question = question_ids(tokenizer, layout.question_prefix, layout.question_suffix,
                                f"Repeat the text that follows: «{quote}»")
        answer = tokenizer(follows, add_special_tokens=False).input_ids[:FISHER_TOKENS]
        ids = torch.tensor([question + answer])
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.update(k, v, i)
        with torch.enable_grad():
            logits = lm.model(input_ids=ids, position_ids=pre.tokens + torch.arange(ids.shape[1])[None],
                              past_key_values=cache).logits[0, len(question) - 1 : -1].float()
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum")
            grads = torch.autograd.grad(loss, keys + values)
        for total, grad in zip(squared, grads, strict=True):
            total += grad[0].pow(2)
    n = len(keys)
    return [unrotate(f.sqrt(), *tables).pow(2) for f in squared[:n]], squared[n:]


def prepare(doc: Path, lm) -> tuple:
    planted, needles = plant_needles(read_document(str(doc)))
    pre = prefill_document(planted, lm)
    evaluator = Evaluator(lm, pre.layout, builtin_probes(planted), needles)
    reference = evaluator.reference(CacheUnderTest(pre.cache, pre.tokens))
    with kvc_attention_in(lm.model):
        scored = score_context(lm, pre.cache, pre.layout, "kvzip")
    tables = rope_tables(lm.model, torch.arange(pre.tokens))
    rms = torch.stack([layer.keys[0].float().pow(2).mean((1, 2)).sqrt() for layer in pre.cache.layers])
    units = key_units(pre.query_energy, rms.double().numpy(), tables[0].shape[-1])
    fisher_keys, fisher_values = fisher(lm, pre, tables)
    return pre, evaluator, reference, scored, tables, units, fisher_keys, fisher_values


def heads_for(ratio: float, pre, scored, tables, units, fisher_keys, fisher_values) -> tuple[list[Head], list]:
    pruning = scored.keep(ratio) if ratio < 1 else None
    heads, layers = [], []
    for i, layer in enumerate(pre.cache.layers):
        keys, values = layer.keys[0].float(), layer.values[0].float()
        keep = pruning.keep[i] if pruning else torch.ones(keys.shape[:2], dtype=torch.bool)
        if pruning:
            values = refit_values(keys, values, keep, pruning.queries.layer(i), pruning.queries.scaling[i])
        plain = unrotate(keys, *tables)
        layers.append((plain, values, keep))
        for h in range(keys.shape[0]):
            rows = keep[h].nonzero().squeeze(-1)
            rows = rows[rows >= SINK_TOKENS]
            f = fisher_keys[i][h, rows].double().mean(0).numpy()
            half = len(f) // 2
            heads.append(Head(i, h, rows, plain[h, rows].double().numpy(), values[h, rows].double().numpy(),
                              units[i, h], scored.scores[i, h, rows].double().numpy(),
                              np.concatenate([(f[:half] + f[half:]) / 2] * 2),
                              fisher_values[i][h, rows].double().sum(1).numpy()))
    return heads, layers


def key_logsteps(heads: list[Head], method: str, step: float) -> list[np.ndarray]:
    base = [np.log(step * h.unit) for h in heads]
    if method != "fisher":
        return base
    return _reallocated(base, [-0.5 * np.log(np.maximum(h.fisher_keys, 1e-30)) for h in heads],
                        [np.full(len(h.unit), len(h.rows)) for h in heads])


def value_logsteps(heads: list[Head], method: str, step: float) -> list[np.ndarray]:
    base = [np.log(step * np.sqrt(np.maximum((h.values ** 2).mean(1), 1e-30))) for h in heads]
    if method == "fisher":
        return _reallocated(base, [-0.5 * np.log(np.maximum(h.fisher_values, 1e-30)) for h in heads],
                            [np.ones(len(h.rows)) for h in heads])
    if method == "score":
        return _reallocated(base, [-0.5 * np.log(np.maximum(h.scores, 1e-30)) for h in heads],
                            [np.ones(len(h.rows)) for h in heads])
    return base


def _reallocated(base: list[np.ndarray], wanted: list[np.ndarray], counts: list[np.ndarray]) -> list[np.ndarray]:
    """`wanted` log-steps moved to the same element-weighted geometric mean as `base` (about the same bits) and kept
    within FISHER_RANGE of it."""
    b, w, n = (np.concatenate(x) for x in (base, wanted, counts))
    mean = np.average(b, weights=n)
    w = np.clip(w - np.average(w, weights=n) + mean, mean - FISHER_RANGE, mean + FISHER_RANGE)
    return np.split(w, np.cumsum([len(x) for x in base])[:-1])


def klt_keys(x: np.ndarray, unit: np.ndarray, step: float,
             basis_bits: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Keys in their own KLT basis (query-weighted), one step for every component; basis_bits None: float basis,
    not counted."""
    y = x / unit
    mean = y.mean(0)
    centred = y - mean
    _, basis = np.linalg.eigh(centred.T @ centred)
    basis = basis[:, ::-1]
    z = centred @ basis
    s = np.maximum(step, np.abs(z).max(0) / 127)
    used = (np.abs(z) / s >= 0.5).any(0)
    side = 8 * x.shape[1] + 4 * int(used.sum())  # mean and unit float32, a step per component
    basis = basis[:, used]
    if basis_bits is not None:
        levels = (1 << (basis_bits - 1)) - 1
        stored = np.rint(basis * levels).astype(np.int8)
        basis, side = stored / levels, side + zstd_bytes(stored)
    q = np.clip(np.rint(centred @ basis / s[used]), -128, 127)
    symbols = np.full(x.shape, 128, np.uint8)
    symbols[:, : int(used.sum())] = q + 128
    return ((q * s[used]) @ basis.T + mean) * unit, symbols, side


def reconstruct(method: str, multiplier: float, heads: list[Head], layers: list) -> tuple[list, int]:
    """(per layer: keys without RoPE, values, keep), bytes stored."""
    out = [(k.clone(), v.clone(), keep) for k, v, keep in layers]
    k_steps = key_logsteps(heads, method, key_step(3) * multiplier)
    v_steps = value_logsteps(heads, method, value_step(3) * multiplier)
    size = 0
    for i, (_, _, keep) in enumerate(layers):
        key_symbols, value_symbols, rows = [], [], []
        for n, head in enumerate(heads):
            if head.layer != i:
                continue
            if method.startswith("klt"):
                bits = None if method == "klt-free" else 8
                keys, symbols, side = klt_keys(head.keys, head.unit, key_step(3) * multiplier, bits)
            else:
                keys, symbols, side = scalar_keys(head.keys, k_steps[n])
            values, v_symbols = row_values(head.values, v_steps[n])
            out[i][0][head.head, head.rows] = torch.from_numpy(keys).float()
            out[i][1][head.head, head.rows] = torch.from_numpy(values).float()
            key_symbols.append(symbols)
            value_symbols.append(v_symbols)
            rows.append(len(head.rows))
            size += side + 2 * len(head.rows) + 2 * 2 * SINK_TOKENS * head.keys.shape[1]  # row steps, sinks
        counts, gaps = encode_positions([row.nonzero().squeeze(-1).numpy() for row in keep])
        size += zstd_bytes(counts) + zstd_bytes(gaps)
        size += coded_bytes(np.concatenate(key_symbols), rows) + coded_bytes(np.concatenate(value_symbols), rows)
    return out, size


def evaluate(lm, pre, evaluator, reference, tables, layers) -> dict:
    pruned = []
    for plain, values, keep in layers:
        keys = rotate(plain, *tables)
        pruned.append(PrunedLayer([keys[h, keep[h]][None] for h in range(len(keep))],
                                  [values[h, keep[h]][None] for h in range(len(keep))], pre.tokens))
    with kvc_attention_in(lm.model):
        return evaluator.evaluate(CacheUnderTest(PrunedCache(pruned), pre.tokens), reference)


def study(doc: Path, lm, out: Path) -> dict:
    started = time.perf_counter()
    pre, evaluator, reference, scored, tables, units, fisher_keys, fisher_values = prepare(doc, lm)
    raw = 2 * 2 * len(pre.cache.layers) * pre.identity["num_kv_heads"] * pre.identity["head_dim"] * pre.tokens
    rows = []
    balanced = out / f".{doc.stem}.kvc"  # today's writer, as a check that the harness sizes the file it writes
    made = write_kvc(pre, balanced, codec="ans", bits=3, pruning=scored.keep(0.3))
    with kvc_attention_in(lm.model):
        metrics = evaluator.evaluate(CacheUnderTest(load(balanced, lm).cache, pre.tokens), reference)
    balanced.unlink()
    rows.append({"method": "balanced file", "ratio": 0.3, "multiplier": 1.0, "bytes": made.file_bytes,
                 "compression": raw / made.file_bytes, "kld": metrics["kld"], "top1": metrics["top1"]})
    by_ratio = {}
    for method, ratio, multiplier in SETTINGS:
        if ratio not in by_ratio:
            by_ratio[ratio] = heads_for(ratio, pre, scored, tables, units, fisher_keys, fisher_values)
        layers, size = reconstruct(method, multiplier, *by_ratio[ratio])
        metrics = evaluate(lm, pre, evaluator, reference, tables, layers)
        rows.append({"method": method, "ratio": ratio, "multiplier": multiplier, "bytes": size,
                     "compression": raw / size, "kld": metrics["kld"], "top1": metrics["top1"]})
        print(json.dumps({"document": doc.name, **rows[-1]}), flush=True)
    result = {"document": doc.name, "tokens": pre.tokens, "seconds": time.perf_counter() - started, "rows": rows}
    (out / f"{doc.stem}.json").write_text(json.dumps(result, indent=2))
    return result


def summarise(results: list[dict], out: Path) -> None:
    keys = [(r["method"], r["ratio"], r["multiplier"]) for r in results[0]["rows"]]
    table = []
    for n, (method, ratio, multiplier) in enumerate(keys):
        rows = [r["rows"][n] for r in results]
        table.append({"method": method, "ratio": ratio, "multiplier": multiplier,
                      **{k: float(np.mean([r[k] for r in rows])) for k in ("compression", "kld", "top1")}})
    lines = [f"# Transform coding and allocations against today's quantizer ({len(results)} document(s): "
             + ", ".join(f"{r['document']} ({r['tokens']} tokens)" for r in results) + ")", "",
             "| method | kept | step × 3-bit | compression | kld | top1 |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['method']} | {t['ratio']:g} | {t['multiplier']:g} | {t['compression']:.2f}× | {t['kld']:.4f} | "
              f"{t['top1']:.3f} |" for t in table]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(table, indent=2))
    plt = require_matplotlib()
    fig, (ax_kld, ax_top1) = plt.subplots(1, 2, figsize=(12, 5))
    for (method, ratio), points in _series(table).items():
        xs = [p["compression"] for p in points]
        style = {"marker": "*", "markersize": 12, "linestyle": "none"} if method == "balanced file" else {
            "marker": "o", "linestyle": "-" if method == "scalar" else "--"}
        (line,) = ax_kld.plot(xs, [p["kld"] for p in points], label=f"{method}, kept {ratio:g}", **style)
        ax_top1.plot(xs, [p["top1"] for p in points], color=line.get_color(), **style)
    finish_plot(fig, ax_kld, ax_top1, "transform coding and allocations vs today's quantizer", results,
                out / "study.png")


def _series(table: list[dict]) -> dict:
    series: dict = {}
    for row in table:
        series.setdefault((row["method"], row["ratio"]), []).append(row)
    return {k: sorted(v, key=lambda r: r["compression"]) for k, v in series.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", type=Path, default=BENCH_DOCS)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2")
    results = [study(doc, lm, args.out) for doc in args.docs]
    summarise(results, args.out)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
