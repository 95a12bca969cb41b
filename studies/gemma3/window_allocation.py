"""How a global budget should treat sliding-window layers (the study behind kvzip_cli.prune.budget.WINDOWS_WHOLE
and WINDOWS_SHARE), on Gemma 3 270M: KVzip scores, values and logit bias refit, 16-bit, the bench's probes and
needles.

    python studies/gemma3/window_allocation.py [--out DIR] [DOC:RATIOS:SHARES ...]

For each document and kept ratio: one threshold over every entry (kvc 0.6's global allocation, which leaves the
windows about 1% of their entries), and the windows taking a given share of each window (their own threshold)
with the full-attention layers sharing what is left by one threshold; share 1 keeps the windows whole. Writes
window-allocation.json and window-allocation.md to --out (default: results/ beside this script).
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvzip_cli.attention import kvc_attention_in
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.evaluation.evaluator import CacheUnderTest, Evaluator
from kvzip_cli.evaluation.probes import builtin_probes, plant_needles
from kvzip_cli.load.loader import load
from kvzip_cli.models.loading import load_model
from kvzip_cli.prune.budget import allocate, check_ratio, top_per_group
from kvzip_cli.prune.scoring import score_context

HERE = Path(__file__).resolve().parent
DOCS = HERE.parents[1] / "examples" / "docs"
DEFAULT = [f"{DOCS}/apache-2.0.txt:0.3,0.25:0.05,0.1,0.2,0.3", f"{DOCS}/long/e2fsprogs-news.txt:0.25:0.1,0.3,1"]


def one_threshold(scored, ratio: float) -> torch.Tensor:
    """kvc 0.6's global allocation: the top entries over every layer, whatever its window."""
    s = scored.scores.clone()
    s[..., scored.protected] = torch.inf
    s[~scored.visible[:, None, :].expand_as(s)] = -torch.inf
    budget = check_ratio(ratio, scored.protected, s.shape[1], scored.visible)
    return top_per_group(s.view(1, -1), torch.tensor([budget])).view(s.shape)


def windows_share(scored, ratio: float, share: float, sliding: torch.Tensor) -> torch.Tensor:
    """`share` of each window by its own threshold (whole at 1), the rest of the budget to the other layers."""
    visible, protected = scored.visible, scored.protected
    keep = torch.zeros_like(scored.scores, dtype=torch.bool)
    keep[sliding] = (visible[sliding][:, None, :].expand_as(keep[sliding]) if share >= 1 else
                     allocate(scored.scores[sliding], share, "layer", protected, visible[sliding]))
    left = round(ratio * keep.shape[1] * int(visible.sum())) - int(keep[sliding].sum())
    keep[~sliding] = allocate(scored.scores[~sliding], left / (keep.shape[1] * int(visible[~sliding].sum())),
                              "global", protected, visible[~sliding])
    return keep


def measure(lm, doc: Path, ratios: list[float], shares: list[float]) -> list[dict]:
    text = doc.read_text()
    planted, needles = plant_needles(text)
    pre = prefill_document(planted, lm)
    evaluator = Evaluator(lm, pre.layout, builtin_probes(text), needles, 32)
    reference = evaluator.reference(CacheUnderTest(pre.cache, pre.tokens))
    scored = score_context(lm, pre.cache, pre.layout, "kvzip")
    sliding = torch.tensor([w is not None for w in pre.geometry.windows])
    rows = []
    for ratio in ratios:
        variants = [("one threshold", one_threshold(scored, ratio))]
        variants += [(f"windows {share:g}", windows_share(scored, ratio, share, sliding)) for share in shares]
        for name, keep in variants:
            pruning = replace(scored.keep(ratio), keep=keep)
            path = Path("/tmp") / f"kvc-window-allocation-{doc.stem}.kvc"
            made = write_kvc(pre, path, pruning=pruning, bits=16, codec="zstd")
            with kvc_attention_in(lm.model):
                metrics = evaluator.evaluate(CacheUnderTest(load(path, lm).cache, pre.tokens), reference)
            path.unlink()
            full = int(scored.visible[~sliding].sum())
            rows.append({"document": doc.name, "tokens": pre.tokens, "ratio": ratio, "variant": name,
                         "kept": made.kept_ratio, "windows_kept": float(keep[sliding].float().sum()
                                                                        / scored.visible[sliding].sum()),
                         "full_layers_kept": float(keep[~sliding].sum()) / full, "kld": metrics["kld"],
                         "top1": metrics["top1"], "needle": metrics["needle"],
                         "needle_full": sum(reference.needle_hits) / len(reference.needle_hits)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=DEFAULT, help="DOC:RATIOS:SHARES, comma-separated lists")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    lm = load_model("gemma3")
    started, rows = time.perf_counter(), []
    for run in args.runs:
        doc, ratios, shares = run.rsplit(":", 2)
        rows += measure(lm, Path(doc), [float(r) for r in ratios.split(",")], [float(s) for s in shares.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "window-allocation.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Sliding-window layers in a global budget (Gemma 3 270M, kvzip, refit with bias, 16-bit)", "",
             f"`python studies/gemma3/window_allocation.py`, {time.perf_counter() - started:.0f} s on 2 CPU cores.", "",
             "| document | tokens | ratio | variant | windows kept | full layers kept | kld | top1 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['document']} | {r['tokens']:,} | {r['ratio']:g} | {r['variant']} | {r['windows_kept']:.1%} | "
              f"{r['full_layers_kept']:.1%} | {r['kld']:.4f} | {r['top1']:.3f} |" for r in rows]
    (args.out / "window-allocation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
