"""Run the standard bench sweep over the example corpus and write a results folder (JSON per document, an
averaged table, and a PNG), so results can be compared across commits.

    python studies/bench-corpus/bench_corpus.py [--model smollm2|gemma3|...] [--peers [NAME,...]]
                                                [--scorers kvzip,...] [--allocations global,...]
                                                [--ratios 0.5,0.3,0.2,0.1] [--bits 16,4,...] [--presets lossless,...]
                                                [--refit on|values|off|both|all]
                                                [--out DIR] [DOC ...]

With every scorer, --peers KVzipPress,CompactorPress and the default ratios this takes about 20 minutes per
4k-token document on 2 CPU cores. The default --out is results/scorers/ beside this script, the run of every
scorer; give each other sweep its own folder under results/.
"""

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

from kvzip_cli.bench.peers import PEERS, require_kvpress
from kvzip_cli.bench.report import plot
from kvzip_cli.bench.runner import run_bench
from kvzip_cli.bench.sweep import DEFAULT_RATIOS, KVC_SCORERS, REFITS, build_sweep
from kvzip_cli.document import read_document
from kvzip_cli.models.loading import load_model
from kvzip_cli.progress import progress_bars

HERE = Path(__file__).resolve().parent
DOCS = HERE.parents[1] / "examples" / "docs"
METRICS = ("kept_ratio", "kld", "top1", "delta_nll", "agreement", "ends", "repetition", "needle", "compression",
           "bits_per_element",
           "memory_ratio", "compress_seconds", "score_seconds", "prefill_seconds", "load_seconds")


def averaged(results: list[dict]) -> list[dict]:
    """Mean of each metric per setting over the documents (settings in sweep order)."""
    by_setting: dict[str, list[dict]] = {}
    for result in results:
        for row in result["rows"]:
            by_setting.setdefault(row["setting"], []).append(row)
    table = []
    for setting, rows in by_setting.items():
        mean = {"setting": setting, "documents": len(rows)}
        for key in METRICS:
            values = [r[key] for r in rows if r[key] is not None]
            mean[key] = sum(values) / len(values) if values else None
        table.append(mean)
    return table


def markdown(table: list[dict], results: list[dict]) -> str:
    lines = [
        f"# kvc bench over {len(results)} documents ({results[0]['model']})",
        "",
        "Documents: " + ", ".join(f"{Path(r['document']).name} ({r['tokens']} tokens, full-cache needle "
                                  f"{r['needle_full']:.2f})" for r in results),
        "",
        "| setting | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for row in table:
        cells = ["–" if row[k] is None else f"{row[k]:.4g}" for k in METRICS]
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", type=Path, default=sorted(DOCS.glob("*.txt")))
    parser.add_argument("--peers", nargs="?", const=",".join(PEERS), default="",
                        help="kvpress presses to measure beside kvc (all when given without names)")
    parser.add_argument("--scorers", default=",".join(KVC_SCORERS))
    parser.add_argument("--allocations", default="", help="default: each scorer's own")
    parser.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)))
    parser.add_argument("--bits", default="16", help="bit widths, comma-separated (16, 32, 8, 4, 3, 2)")
    parser.add_argument("--presets", default="", help="presets to measure, comma-separated")
    parser.add_argument("--refit", choices=tuple(REFITS), default="on",
                        help="pruned settings refit with a logit bias (on), refit without it (values), not refit "
                             "(off), on and off side by side (both), or all three")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scorers")
    parser.add_argument("--model", default="smollm2", help="kvc --model (default: the embedded SmolLM2)")
    args = parser.parse_args()
    if args.peers:
        require_kvpress()
    names = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    sweep = build_sweep(ratios=tuple(float(r) for r in names(args.ratios)), scorers=names(args.scorers),
                        peers=names(args.peers), allocations=names(args.allocations) or (None,),
                        bits=tuple(int(b) for b in names(args.bits)), presets=names(args.presets),
                        refits=REFITS[args.refit])
    write_results(measure(args.docs, sweep, args.out, args.model), args.out)
    print((args.out / "summary.md").read_text())


def measure(docs: list[Path], sweep: list, out: Path, model: str = "smollm2") -> list[dict]:
    """Run `sweep` on each document with `model`; each document's JSON is written to `out` as it ends."""
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(model)
    results = []
    for doc in docs:
        started = time.perf_counter()
        with progress_bars(True) as task:
            result = run_bench(read_document(str(doc)), doc.name, lm, sweep, [], task).as_json()
        result["bench_seconds"] = time.perf_counter() - started
        (out / f"{doc.stem}.json").write_text(json.dumps(result, indent=2))
        results.append(result)
        print(f"{doc.name}: {result['tokens']} tokens, {result['bench_seconds']:.0f} s", flush=True)
    return results


def write_results(results: list[dict], out: Path, plot_name: str = "corpus.png") -> None:
    """The averaged table (summary.json, summary.md) and the plot."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    table = averaged(results)
    summary = {"commit": commit.strip(), "machine": platform.processor() or platform.machine(),
               "documents": [r["document"] for r in results], "averaged": table}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(table, results))
    plot(results, out / plot_name)


if __name__ == "__main__":
    main()
