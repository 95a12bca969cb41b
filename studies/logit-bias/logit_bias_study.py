"""A per-key logit bias after pruning (the other half of Attention Matching, beside the value refit), measured
against the value refit alone on the bench documents, in one run: does restoring the pruned attention mass help?

Pruning removes attention mass: a query's weights are renormalised over the kept keys, so the context as a whole
gets less weight, against the question's own tokens, than the full context had. Attention Matching (arXiv
2602.16284) gives each kept key j a logit bias β_j = log w_j so that the kept keys carry the full context's mass on
reference queries, Σ_{j∈S} w_j exp(q·k_j) ≈ Σ_{all j} exp(q·k_j), and then refits the kept values with those biased
weights. Methods, all on the same kept entries (KVzip scores) and the same reference queries (KVzip's
reconstruction queries, as kvc's refit uses):

- refit: today's (values refit, no bias).
- bias: w ≥ 0 by non-negative least squares on each query's mass ratio (multiplicative updates, w within
  [1/100, 100]), the values refit with the biased weights, attention over the file adds β_j to key j's logit. Needs
  a stored bias per kept entry and an attention that adds it: llama.cpp and MLX-LM caches have no place for it.
- keys: the same bias folded into the keys, so that no format or attention change is needed: each kept key moves by
  the δk_j minimising Σ_i a_ij (q_i·δk_j − β_j)² (a_ij the biased weight of query i on key j; ridge 1% of the
  diagonal), then the values are refit to the moved keys. It works only as far as the queries that read a key agree
  on a direction.

Every method is judged like `kvc bench`: kld and top1 teacher-forced against the full cache over the bench's probes.
Quantized rows use today's 3-bit quantizer (studies/quantizer_harness.py: scalar keys and row values, sizes as the
format would store them) and count the bias as float16 per kept entry, zstd-coded.

    python studies/logit-bias/logit_bias_study.py [--out DIR] [DOC ...]

About 20 minutes per document on 2 CPU cores (the folded keys take most of it); writes DIR/<doc>.json,
DIR/summary.md and DIR/study.png (DIR: results/ beside this script by default).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvc_format import encode_positions
from kvzip_cli.attention import kvc_attention_in
from kvzip_cli.bench.report import require_matplotlib
from kvzip_cli.compress.key_units import key_units
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.quantize import key_step, value_step
from kvzip_cli.document import read_document
from kvzip_cli.evaluation.evaluator import CacheUnderTest, Evaluator
from kvzip_cli.evaluation.probes import builtin_probes, plant_needles
from kvzip_cli.load.pruned_cache import PrunedCache, PrunedLayer
from kvzip_cli.models.loading import load_model
from kvzip_cli.prune.budget import SINK_TOKENS
from kvzip_cli.prune.refit import RIDGE
from kvzip_cli.prune.scoring import score_context
from kvzip_cli.rope import rope_tables, rotate, unrotate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # studies/: the harness shared with transform
from quantizer_harness import BENCH_DOCS, coded_bytes, finish_plot, row_values, scalar_keys, zstd_bytes  # noqa: E402

HERE = Path(__file__).resolve().parent

BIAS_ITERATIONS, BIAS_RANGE, FOLD_RIDGE, FOLD_QUERIES = 100, 100.0, 0.01, 2048
# (method, kept ratio, bits: 16 stores floats, 3 today's 3-bit keys and values)
SETTINGS = [(m, r, 16) for r in (0.3, 0.2, 0.1) for m in ("refit", "bias")] + [("keys", r, 16) for r in (0.3, 0.2)] + [
    (m, r, 3) for r in (0.3, 0.2) for m in ("refit", "bias")]


class BiasedLayer(PrunedLayer):
    """A PrunedLayer whose kept keys each add a logit bias, per head (kept_h,); full attention layers, no softcap."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], context_length: int,
                 bias: list[torch.Tensor]):
        super().__init__(keys, values, context_length)
        self.bias = bias

    def attend(self, query: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
        assert softcap is None
        kv_heads = len(self.kept)
        batch, heads, q_len, dim = query.shape
        group, new = heads // kv_heads, self.keys.shape[2]
        rows = torch.arange(q_len)[:, None] + (new - q_len)
        future = torch.zeros(q_len, new).masked_fill(torch.arange(new)[None, :] > rows, float("-inf"))
        outputs = []
        for h, (start, n) in enumerate(zip(self.starts, self.kept, strict=True)):
            q = query[:, h * group : (h + 1) * group].reshape(batch, 1, group * q_len, dim)
            k = self.buffer_keys[:, None, start : start + n + new]
            v = self.buffer_values[:, None, start : start + n + new]
            mask = torch.cat([self.bias[h][None, :].expand(q_len, n), future], 1).repeat(group, 1).to(q.dtype)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
            outputs.append(out.reshape(batch, group, q_len, dim))
        return torch.cat(outputs, dim=1).transpose(1, 2).contiguous()


def fit_head(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, scaling: float,
             method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """queries (n, head_dim), keys/values (tokens, head_dim) post-RoPE float64, kept (k,) → kept keys, refit values,
    bias (k,)."""
    logits = queries @ keys.T * scaling
    exp = torch.exp(logits - logits.max(-1, keepdim=True).values)
    mass = exp.sum(-1, keepdim=True)
    target = exp / mass @ values
    bias = torch.zeros(len(kept), dtype=keys.dtype)
    kept_keys = keys[kept]
    if method != "refit":
        share = exp[:, kept] / mass  # each query's weight on each kept key, over the full context
        gram, wanted = share.T @ share, share.sum(0)
        w = torch.ones_like(bias)
        for _ in range(BIAS_ITERATIONS):  # Lee–Seung multiplicative updates of min ‖share·w − 1‖², w ≥ 0
            w = (w * wanted / (gram @ w).clamp_min(1e-30)).clamp(1 / BIAS_RANGE, BIAS_RANGE)
        bias = w.log()
    if method == "keys":
        few = queries[:: max(1, len(queries) // FOLD_QUERIES)] * scaling
        weights = torch.softmax(few @ kept_keys.T + bias, -1)
        gram = torch.einsum("ij,id,ie->jde", weights, few, few)
        lam = FOLD_RIDGE * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        gram += lam[:, None, None] * torch.eye(keys.shape[1], dtype=keys.dtype)
        kept_keys = kept_keys + torch.linalg.solve(gram, (weights * bias).T @ few)
        bias = torch.zeros_like(bias)
    weights = torch.softmax(queries @ kept_keys.T * scaling + bias, -1)
    gram = weights.T @ weights
    lam = RIDGE * gram.diagonal().mean()
    solved = torch.linalg.solve(gram + lam * torch.eye(len(kept), dtype=gram.dtype),
                                weights.T @ target + lam * values[kept])
    return kept_keys, solved, bias


def fitted_layers(method: str, pruning, pre) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: keys (post-RoPE, every position; kept rows as fitted), values, keep, bias per kept entry."""
    layers = []
    for i, layer in enumerate(pre.cache.layers):
        keys, values = layer.keys[0].double(), layer.values[0].double()
        keep = pruning.keep[i]
        queries = pruning.queries.layer(i).double()
        group = queries.shape[0] // keys.shape[0]
        biases = []
        keys_out, values_out = keys.clone(), values.clone()
        for h in range(keys.shape[0]):
            kept = keep[h].nonzero().squeeze(-1)
            q = queries[h * group : (h + 1) * group].reshape(-1, keys.shape[-1])
            k, v, b = fit_head(q, keys[h], values[h], kept, pruning.queries.scaling[i], method)
            keys_out[h, kept], values_out[h, kept] = k, v
            biases.append(b)
        layers.append((keys_out.float(), values_out.float(), keep, biases))
    return layers


def quantized(layers: list, tables, units: np.ndarray) -> tuple[list, int]:
    """Today's 3-bit keys (RoPE removed, per channel) and values (per row) of the kept entries past the sinks; the
    layers as the file would give them back and the bytes it would take (bias included)."""
    out, size = [], 0
    for i, (keys, values, keep, biases) in enumerate(layers):
        plain, values = unrotate(keys, *tables), values.clone()
        key_symbols, value_symbols, counts = [], [], []
        for h in range(len(keep)):
            rows = keep[h].nonzero().squeeze(-1)
            rows = rows[rows >= SINK_TOKENS]
            k, symbols, side = scalar_keys(plain[h, rows].double().numpy(), np.log(key_step(3) * units[i, h]))
            v, v_symbols = row_values(values[h, rows].double().numpy(),
                                      np.log(value_step(3) * np.sqrt(np.maximum(
                                          (values[h, rows].double().numpy() ** 2).mean(1), 1e-30))))
            plain[h, rows], values[h, rows] = torch.from_numpy(k).float(), torch.from_numpy(v).float()
            key_symbols.append(symbols)
            value_symbols.append(v_symbols)
            counts.append(len(rows))
            size += side + 2 * len(rows) + 2 * 2 * SINK_TOKENS * k.shape[1]  # row steps, sinks
        positions, gaps = encode_positions([row.nonzero().squeeze(-1).numpy() for row in keep])
        size += zstd_bytes(positions) + zstd_bytes(gaps)
        size += coded_bytes(np.concatenate(key_symbols), counts) + coded_bytes(np.concatenate(value_symbols), counts)
        if any(b.abs().max() > 0 for b in biases):
            size += zstd_bytes(torch.cat(biases).numpy().astype(np.float16))
        out.append((rotate(plain, *tables), values, keep, biases))
    return out, size


def float_bytes(layers: list) -> int:
    """16-bit kept keys and values plus positions and any bias, as a pruned float16 file would hold them."""
    size = 0
    for keys, _, keep, biases in layers:
        size += 2 * 2 * int(keep.sum()) * keys.shape[-1]
        positions, gaps = encode_positions([row.nonzero().squeeze(-1).numpy() for row in keep])
        size += zstd_bytes(positions) + zstd_bytes(gaps)
        if any(b.abs().max() > 0 for b in biases):
            size += zstd_bytes(torch.cat(biases).numpy().astype(np.float16))
    return size


def evaluate(lm, pre, evaluator, reference, layers: list) -> dict:
    pruned = []
    for keys, values, keep, biases in layers:
        k = [keys[h, keep[h]][None] for h in range(len(keep))]
        v = [values[h, keep[h]][None] for h in range(len(keep))]
        if any(b.abs().max() > 0 for b in biases):
            pruned.append(BiasedLayer(k, v, pre.tokens, [b.float() for b in biases]))
        else:
            pruned.append(PrunedLayer(k, v, pre.tokens))
    with kvc_attention_in(lm.model):
        return evaluator.evaluate(CacheUnderTest(PrunedCache(pruned), pre.tokens), reference)


def study(doc: Path, lm, out: Path) -> dict:
    started = time.perf_counter()
    planted, needles = plant_needles(read_document(str(doc)))
    pre = prefill_document(planted, lm)
    evaluator = Evaluator(lm, pre.layout, builtin_probes(planted), needles)
    reference = evaluator.reference(CacheUnderTest(pre.cache, pre.tokens))
    with kvc_attention_in(lm.model):
        scored = score_context(lm, pre.cache, pre.layout, "kvzip")
    tables = rope_tables(lm.model, torch.arange(pre.tokens))
    rms = torch.stack([layer.keys[0].float().pow(2).mean((1, 2)).sqrt() for layer in pre.cache.layers])
    units = key_units(pre.query_energy, rms.double().numpy(), tables[0].shape[-1])
    raw = 2 * 2 * len(pre.cache.layers) * pre.identity["num_kv_heads"] * pre.identity["head_dim"] * pre.tokens
    rows = []
    for method, ratio, bits in SETTINGS:
        t = time.perf_counter()
        layers = fitted_layers(method, scored.keep(ratio), pre)
        fit_seconds = time.perf_counter() - t
        if bits == 16:
            size = float_bytes(layers)
        else:
            layers, size = quantized(layers, tables, units)
        metrics = evaluate(lm, pre, evaluator, reference, layers)
        rows.append({"method": method, "ratio": ratio, "bits": bits, "bytes": size, "compression": raw / size,
                     "kld": metrics["kld"], "top1": metrics["top1"], "fit_seconds": fit_seconds})
        print(json.dumps({"document": doc.name, **rows[-1]}), flush=True)
    result = {"document": doc.name, "tokens": pre.tokens, "seconds": time.perf_counter() - started, "rows": rows}
    (out / f"{doc.stem}.json").write_text(json.dumps(result, indent=2))
    return result


def summarise(results: list[dict], out: Path) -> None:
    table = []
    for n, (method, ratio, bits) in enumerate(SETTINGS):
        rows = [r["rows"][n] for r in results]
        table.append({"method": method, "ratio": ratio, "bits": bits,
                      **{k: float(np.mean([r[k] for r in rows])) for k in ("compression", "kld", "top1",
                                                                            "fit_seconds")}})
    lines = [f"# A per-key logit bias against today's refit ({len(results)} document(s): "
             + ", ".join(f"{r['document']} ({r['tokens']} tokens)" for r in results) + "; mean)", "",
             "| method | kept | bits | compression | kld | top1 | fit seconds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {t['method']} | {t['ratio']:g} | {t['bits']} | {t['compression']:.2f}× | {t['kld']:.4f} | "
              f"{t['top1']:.3f} | {t['fit_seconds']:.1f} |" for t in table]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(table, indent=2))
    plt = require_matplotlib()
    fig, (ax_kld, ax_top1) = plt.subplots(1, 2, figsize=(12, 5))
    series: dict = {}
    for row in table:
        series.setdefault(f"{row['method']}, {row['bits']}-bit", []).append(row)
    for label, points in series.items():
        points = sorted(points, key=lambda p: p["compression"])
        xs = [p["compression"] for p in points]
        style = {"marker": "o", "linestyle": "-" if label.startswith("refit") else "--"}
        (line,) = ax_kld.plot(xs, [p["kld"] for p in points], label=label, **style)
        ax_top1.plot(xs, [p["top1"] for p in points], color=line.get_color(), **style)
    finish_plot(fig, ax_kld, ax_top1, "a per-key logit bias after pruning vs today's refit", results, out / "study.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", type=Path, default=BENCH_DOCS)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    lm = load_model("smollm2")
    results = [study(doc, lm, args.out) for doc in args.docs]
    summarise(results, args.out)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
