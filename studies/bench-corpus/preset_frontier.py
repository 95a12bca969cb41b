"""Measure candidate presets (kept ratio, value bits, key bits; KVzip scores, values refit with a logit bias,
rANS) over the bench documents and write results/frontier/ beside this script: JSON per document, an averaged table
and a plot of kld and top1 against compression, one line per bit combination over the ratios.

    python studies/bench-corpus/preset_frontier.py [--candidates 0.3:3:3,0.25:2:3,...] [--beside DIR] [--out DIR]
                                                   [DOC ...]

--beside DIR draws an earlier bench_corpus.py run on the same documents (its DIR/<doc>.json: today's settings,
kvpress; default results/refit/) on the same axes.

The default candidates lie around the `balanced` and `small` presets (kept ratio, value and key bits), the points
the presets were chosen from; about 10 minutes per 4k-token document on 2 CPU cores.
"""

import argparse
import json
from pathlib import Path

from bench_corpus import measure, write_results

from kvzip_cli.bench.report import plot
from kvzip_cli.bench.sweep import Setting

HERE = Path(__file__).resolve().parent
DOCS = [HERE.parents[1] / "examples" / "docs" / f"{name}.txt" for name in ("apache-2.0", "mpl-2.0", "gpl-2")]
CANDIDATES = "0.3:3:3,0.25:3:3,0.3:2:3,0.25:2:3,0.22:3:3,0.12:2:3,0.1:2:3,0.08:2:3,0.1:2:2"


def candidate_sweep(spec: str) -> list[Setting]:
    """"ratio:value_bits:key_bits,…" → the kvc settings, a plot line per (key bits, value bits)."""
    sweep = []
    for item in spec.split(","):
        ratio, value_bits, key_bits = item.split(":")
        r, vb, kb = float(ratio), int(value_bits), int(key_bits)
        sweep.append(Setting(f"kvzip {r:g} k{kb}/v{vb}", f"kvc kvzip, {kb}-bit keys/{vb}-bit values", "kvc", r, vb,
                             "ans", scorer="kvzip", key_bits=kb, refit="bias"))
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", type=Path, default=DOCS)
    parser.add_argument("--candidates", default=CANDIDATES, help="ratio:value_bits:key_bits, comma-separated")
    parser.add_argument("--beside", type=Path, default=HERE / "results" / "refit")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "frontier")
    args = parser.parse_args()
    results = measure(args.docs, candidate_sweep(args.candidates), args.out)
    write_results(results, args.out, "candidates.png")
    plot_beside(results, args.beside, args.out / "frontier.png")
    print((args.out / "summary.md").read_text())


def plot_beside(results: list[dict], earlier: Path, output: Path) -> None:
    """The candidates and an earlier run's rows on the same documents, on one plot."""
    merged = []
    for result in results:
        before = json.loads((earlier / f"{Path(result['document']).stem}.json").read_text())
        merged.append({**result, "rows": before["rows"] + result["rows"]})
    plot(merged, output)


if __name__ == "__main__":
    main()
