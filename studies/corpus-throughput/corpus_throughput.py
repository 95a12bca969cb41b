"""Measure what compressing a corpus in one command saves over a loop of single `kvc compress` calls: documents per
hour and tokens per second, end to end (process start, model load, every document), for

  loop    one `kvc compress DOC -o DOC.kvc` process per document (the model loads each time)
  local   one `kvc compress FOLDER -o OUT` (the local engine: one model)
  ray     the same with `--engine ray` (a local Ray cluster started by the command, 2 actors of one thread each)

on the same small documents with the same settings and one torch thread each (`--threads 1`: the Ray actors' own
count on a 2-core machine, and on a shared machine two threads can be far slower than one), into fresh output
folders. The ways alternate within each round (the machine's other load falls on all of them alike) and every
figure is the mean over the rounds.

    python studies/corpus-throughput/corpus_throughput.py [--documents 6] [--chars 1500] [--rounds 2] [--out DIR]
    python studies/corpus-throughput/corpus_throughput.py --ways loop,local   # without Ray

--out defaults to results/<documents>x<chars>/ beside this script.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = sorted((HERE.parents[1] / "examples" / "docs").glob("*.txt"))
WAYS = ("loop", "local", "ray")


def kvc(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvzip_cli", *map(str, args)], capture_output=True, text=True,
                          check=True)


def make_corpus(folder: Path, documents: int, chars: int) -> list[Path]:
    """`documents` slices of `chars` characters from the example documents, in turn."""
    paths = []
    for i in range(documents):
        source = SOURCES[i % len(SOURCES)].read_text()
        start = (i // len(SOURCES)) * chars
        path = folder / f"doc{i:02d}.txt"
        path.write_text(source[start : start + chars])
        paths.append(path)
    return paths


def run_way(way: str, folder: Path, docs: list[Path], out: Path, settings: list[str]) -> dict:
    """Seconds end to end and tokens compressed, for one way."""
    started = time.perf_counter()
    if way == "loop":
        out.mkdir()
        tokens = sum(json.loads(kvc("compress", doc, "-o", out / f"{doc.stem}.kvc", *settings, "--json").stdout)
                     ["tokens"] for doc in docs)
    else:
        engine = ["--engine", "ray", "--actors", "2"] if way == "ray" else []
        summary = json.loads(kvc("compress", folder, "-o", out, *settings, *engine, "--json").stdout)
        assert summary["ok"] == len(docs), summary
        tokens = summary["tokens"]
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=6)
    parser.add_argument("--chars", type=int, default=1500, help="characters per document")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--settings", default="", help="options for every kvc compress, beside --threads 1 "
                        "(default: none, the default preset)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.out = args.out or HERE / "results" / f"{args.documents}x{args.chars}"
    ways, settings = args.ways.split(","), args.settings.split() + ["--threads", "1"]
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        docs = make_corpus(folder, args.documents, args.chars)
        for r in range(args.rounds):
            order = ways if r % 2 == 0 else ways[::-1]
            for way in order:
                runs[way].append(run_way(way, folder, docs, Path(tmp) / f"{way}-{r}", settings))
                print(f"round {r + 1}: {way} {runs[way][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for way in ways:
        seconds = statistics.mean(run["seconds"] for run in runs[way])
        tokens = runs[way][0]["tokens"]
        rows.append({"way": way, "documents": args.documents, "tokens": tokens, "seconds": seconds,
                     "runs": [run["seconds"] for run in runs[way]], "documents_per_hour": 3600 * args.documents /
                     seconds, "tokens_per_second": tokens / seconds})
    loop = next((row["seconds"] for row in rows if row["way"] == "loop"), None)
    for row in rows:
        row["speedup_vs_loop"] = loop / row["seconds"] if loop else None
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"documents": args.documents, "chars": args.chars, "rounds": args.rounds,
              "settings": settings, "rows": rows}
    (args.out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ["| way | documents/hour | tokens/s | seconds (mean of rounds) | vs loop |", "|---|---|---|---|---|"]
    for row in rows:
        speedup = f"{row['speedup_vs_loop']:.2f}x" if row["speedup_vs_loop"] else ""
        table.append(f"| {row['way']} | {row['documents_per_hour']:,.0f} | {row['tokens_per_second']:.1f} | "
                     f"{row['seconds']:.1f} ({', '.join(f'{s:.1f}' for s in row['runs'])}) | {speedup} |")
    (args.out / "throughput.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
