"""Does the self-check predict held-out question fidelity? And what does `--target-top1` give on the corpus?

    python studies/calibration/calibration.py [--targets 0.97,0.9] [--out DIR] [DOC ...]

Per document (examples/docs/*.txt by default), with the embedded model:
1. Prefill and KVzip-score once; take the full cache's reference for the self-check
   (kvzip_cli.evaluation.self_check) and for the document's held-out questions (examples/questions/<doc>.txt:
   user-style questions the search never sees, 12 per document; the bench's kld and top1 along the full cache's
   greedy 32-token answers).
2. A grid of settings (kept ratio × key/value bits, the balanced preset among them): each written, loaded, then
   self-checked and asked the held-out questions. Three self-checks are compared on the same files: the shipped
   8 reconstruction + 4 question probes, the earlier 4 + 4, and 8 + 8. Over all documents: the correlation between
   each self-check and the held-out figures, and the worst miss (held-out top1 below the self-check's).
3. `kvc compress --target-top1` at each target (kvzip_cli.compress.calibrate, the product path, reusing the prefill
   and scores): the chosen settings, file size, search cost in prefills, and the held-out figures of the file it
   wrote, beside the balanced preset's.

Writes one JSON per document and summary.md to --out (default: results/ beside this script). About 45 minutes on 2
CPU cores for the six documents.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvzip_cli.attention import kvc_attention_in
from kvzip_cli.compress.calibrate import Candidate, Target, calibrate
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.settings import QuantOptions
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.evaluation.evaluator import CacheUnderTest, Evaluator
from kvzip_cli.evaluation.metrics import FidelityTotals
from kvzip_cli.evaluation.probes import read_probes
from kvzip_cli.evaluation.self_check import QUESTION_PROBES, RECONSTRUCTION_PROBES, SelfCheck
from kvzip_cli.load.loader import load
from kvzip_cli.models.loading import load_model
from kvzip_cli.prune.scoring import score_context

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples"  # the documents and their held-out questions
GRID = [Candidate(r, k, b) for r, k, b in (
    (1.0, 8, 8), (1.0, 4, 4), (1.0, 3, 3), (0.6, 8, 8), (0.6, 4, 4), (0.4, 8, 8), (0.4, 4, 4), (0.3, 4, 4),
    (0.3, 3, 3), (0.2, 4, 4), (0.2, 3, 3), (0.12, 3, 2),
)]
BALANCED = Candidate(0.3, 3, 3)  # the balanced preset: 30% kept by KVzip, 3-bit keys and values, rANS
SHIPPED = f"{RECONSTRUCTION_PROBES}+{QUESTION_PROBES}"
VARIANTS = {SHIPPED: (RECONSTRUCTION_PROBES, QUESTION_PROBES), "4+4": (4, 4), "8+8": (8, 8)}  # reconstruction+question


class HeldOut:
    """The held-out questions' full-cache answers, then kld/top1 of any cache along them (teacher-forced)."""

    def __init__(self, lm, pre, questions):
        self.evaluator = Evaluator(lm, pre.layout, questions, [], new_tokens=32)
        self.reference = self.evaluator.reference(CacheUnderTest(pre.cache, pre.tokens))
        self.tokens = pre.tokens

    @torch.inference_mode()
    def run(self, cache) -> dict:
        totals = FidelityTotals()
        cut = CacheUnderTest(cache, self.tokens)
        for ref in self.reference.probes:
            totals.add_positions(ref.logprobs, self.evaluator.answer_logprobs(cut, ref.question, ref.answer),
                                 ref.answer)
        return {"top1": totals.summary()["top1"], "kld": totals.summary()["kld"]}


def measure(lm, pre, scored, candidate: Candidate, checks: dict[str, SelfCheck], held_out: HeldOut,
            path: Path) -> dict:
    pruning = scored.keep(candidate.ratio) if candidate.ratio < 1 else None
    made = write_kvc(pre, path, codec="ans", bits=candidate.bits, pruning=pruning,
                     quant=QuantOptions(key_bits=candidate.key_bits))
    with kvc_attention_in(lm.model):
        cache = load(path, lm).cache
        own = {name: check.run(cache) for name, check in checks.items()}
        other = held_out.run(cache)
    return {"ratio": candidate.ratio, "key_bits": candidate.key_bits, "bits": candidate.bits,
            "file_bytes": made.file_bytes, "self_top1": own[SHIPPED].top1, "self_kld": own[SHIPPED].kld,
            "held_top1": other["top1"], "held_kld": other["kld"],
            "variants": {name: {"top1": r.top1, "kld": r.kld} for name, r in own.items()}}


def run_document(lm, doc: Path, targets: list[Target], out: Path) -> dict:
    text = doc.read_text()
    questions = read_probes(EXAMPLES / "questions" / doc.name)
    pre = prefill_document(text, lm)
    scored = score_context(lm, pre.cache, pre.layout, "kvzip")
    checks = {name: SelfCheck(pre, *counts) for name, counts in VARIANTS.items()}
    held_out = HeldOut(lm, pre, questions)
    with tempfile.TemporaryDirectory() as tmp:
        grid = [measure(lm, pre, scored, c, checks, held_out, Path(tmp) / "grid.kvc") for c in GRID]
        calibrated = {}
        for target in targets:
            path = Path(tmp) / "calibrated.kvc"
            calibration, made = calibrate(pre, scored, target, path)
            with kvc_attention_in(lm.model):
                chosen_held_out = held_out.run(load(path, lm).cache)
            calibrated[str(target.top1)] = {**calibration.header(), "file_bytes": made.file_bytes,
                                            "held_out": chosen_held_out,
                                            "trial_log": [t.as_json() for t in calibration.trials]}
    balanced = next(g for g in grid if (g["ratio"], g["key_bits"], g["bits"]) == (0.3, 3, 3))
    result = {
        "document": doc.name, "tokens": pre.tokens, "prefill_seconds": pre.prefill_seconds,
        "score_seconds": scored.seconds, "questions": [q.question for q in questions], "grid": grid,
        "calibrated": calibrated,
        "balanced": balanced,
    }
    (out / f"{doc.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def pearson(points: list[dict], metric: str) -> float:
    """Correlation of the self-check's `metric` with the held-out questions' over the measured files."""
    xs, ys = [p[f"self_{metric}"] for p in points], [p[f"held_{metric}"] for p in points]
    return statistics.correlation(xs, ys) if len(set(xs)) > 1 and len(set(ys)) > 1 else float("nan")


def summary(results: list[dict], targets: list[Target]) -> str:
    points = [{**g, "document": r["document"]} for r in results for g in r["grid"]]
    lines = [
        "# Calibration: self-check against held-out questions",
        "",
        "Embedded SmolLM2-135M-Instruct on 2 CPU cores, KVzip scores. `python studies/calibration/calibration.py`.",
        "",
    ]
    for target in targets:
        lines += target_table(results, str(target.top1))
    lines += [
        f"## Does the self-check predict held-out fidelity? ({len(points)} files: {len(GRID)} settings × "
        f"{len(results)} documents)",
        "",
        "| self-check | probes | Pearson r, top1 | Pearson r, kld | worst miss (held-out top1 below self-check) |",
        "|---|---|---:|---:|---|",
    ]
    for name, (reconstruction, question) in VARIANTS.items():
        probes = f"{reconstruction} reconstruction + {question} question" + (" (shipped)" if name == SHIPPED else "")
        view = [{**p, "self_top1": p["variants"][name]["top1"], "self_kld": p["variants"][name]["kld"]}
                for p in points]
        worst = max(view, key=lambda p: p["self_top1"] - p["held_top1"])
        lines.append(f"| {name} | {probes} | {pearson(view, 'top1'):.3f} | {pearson(view, 'kld'):.3f} | "
                     f"{worst['self_top1'] - worst['held_top1']:+.3f} ({worst['self_top1']:.3f} vs "
                     f"{worst['held_top1']:.3f}, {worst['document']} at ratio {worst['ratio']:g}, "
                     f"{worst['key_bits']}/{worst['bits']} bits) |")
    lines += ["", "| document | ratio | k/v bits | file MB | self top1 | held-out top1 | self kld | held-out kld |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for g in r["grid"]:
            lines.append(f"| {r['document']} | {g['ratio']:g} | {g['key_bits']}/{g['bits']} | "
                         f"{g['file_bytes'] / 1e6:.2f} | {g['self_top1']:.3f} | {g['held_top1']:.3f} | "
                         f"{g['self_kld']:.4f} | {g['held_kld']:.4f} |")
    return "\n".join(lines) + "\n"


def target_table(results: list[dict], key: str) -> list[str]:
    lines = [
        f"## `--target-top1 {key}` against the balanced preset",
        "",
        "| document | tokens | chosen (ratio, k/v bits) | file MB | balanced MB | self-check top1 / kld "
        "| held-out top1 / kld | balanced held-out top1 / kld | trials | search cost (prefills) |",
        "|---|---:|---|---:|---:|---|---|---|---:|---:|",
    ]
    for r in results:
        c, b = r["calibrated"][key], r["balanced"]
        chosen = c["chosen"]
        lines.append(
            f"| {r['document']} | {r['tokens']:,} | {chosen['ratio']:g}, {chosen['key_bits']}/{chosen['bits']} | "
            f"{c['file_bytes'] / 1e6:.2f} | {b['file_bytes'] / 1e6:.2f} | {c['self_check']['top1']:.3f} / "
            f"{c['self_check']['kld']:.4f} | {c['held_out']['top1']:.3f} / {c['held_out']['kld']:.4f} | "
            f"{b['held_top1']:.3f} / {b['held_kld']:.4f} | {c['trials']} | {c['search_prefills']:.1f} |")
    mean_cal = statistics.mean(r["calibrated"][key]["file_bytes"] for r in results)
    mean_bal = statistics.mean(r["balanced"]["file_bytes"] for r in results)
    mean_held = statistics.mean(r["calibrated"][key]["held_out"]["top1"] for r in results)
    mean_bal_held = statistics.mean(r["balanced"]["held_top1"] for r in results)
    return lines + [
        "",
        f"Mean file size: calibrated {mean_cal / 1e6:.2f} MB, balanced {mean_bal / 1e6:.2f} MB. Held-out top1: "
        f"calibrated mean {mean_held:.3f}, min {min(r['calibrated'][key]['held_out']['top1'] for r in results):.3f}; "
        f"balanced mean {mean_bal_held:.3f}, min {min(r['balanced']['held_top1'] for r in results):.3f}.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", type=Path)
    parser.add_argument("--targets", default="0.97,0.9", help="--target-top1 values, comma-separated")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    docs = args.docs or sorted((EXAMPLES / "docs").glob("*.txt"))
    args.out.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2", device="cpu")
    targets = [Target(top1=float(t)) for t in args.targets.split(",")]
    results = []
    for doc in docs:
        started = time.perf_counter()
        results.append(run_document(lm, doc, targets, args.out))
        print(f"{doc.name}: {time.perf_counter() - started:.0f} s", flush=True)
    (args.out / "summary.md").write_text(summary(results, targets))
    print(summary(results, targets))


if __name__ == "__main__":
    main()
