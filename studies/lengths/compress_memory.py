"""Peak memory and time of `kvc compress` against document length: one `kvc compress` process per document, its
peak RSS read from the kernel (wait4), so every figure is that process's own, with its seconds against the one
prefill of the document it includes.

    python studies/lengths/compress_memory.py [--lengths 1k,2k,4k,8k] [--preset balanced] [--out results.json]
    python studies/lengths/compress_memory.py --model gemma3 examples/docs/long/*.txt

Without documents, they are the example corpus concatenated (licences, no repetition) and cut to each length in
tokens of the model (the embedded one's context ends at 8,192 positions).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kvzip_cli
from kvzip_cli.bench.lengths import check_lengths, document_of, parse_lengths

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"


def corpus() -> str:
    return "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.txt")))


def compress_peak(document: Path, output: Path, preset: str, model: str) -> tuple[dict, float, float]:
    """(kvc compress --json result, peak RSS in GiB, seconds) of one compress process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kvzip_cli", "compress", str(document), "-o", str(output),
                             "--preset", preset, "--model", model, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"kvc compress failed on {document} (exit {proc.returncode})")
    return json.loads(stdout), usage.ru_maxrss / 2**20, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", type=Path, help="documents to compress as they are (default: the corpus "
                        "cut to --lengths)")
    parser.add_argument("--lengths", default="1k,2k,4k,8k")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    print(f"{'tokens':>7}{'peak RSS GiB':>14}{'seconds':>9}{'prefill s':>11}{'x prefill':>11}{'file MB':>9}"
          f"{'x fp16':>8}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.docs or _cut_corpus(args.model, args.lengths, Path(tmp)):
            made, peak, seconds = compress_peak(path, Path(tmp) / "out.kvc", args.preset, args.model)
            rows.append({"document": path.name if args.docs else None, "tokens": made["tokens"],
                         "peak_rss_gib": peak, "seconds": seconds, "prefill_seconds": made["prefill_seconds"],
                         "file_bytes": made["file_bytes"], "compression": made["compression"]})
            print(f"{made['tokens']:>7}{peak:>14.2f}{seconds:>9.1f}{made['prefill_seconds']:>11.1f}"
                  f"{seconds / made['prefill_seconds']:>11.1f}{made['file_bytes'] / 1e6:>9.2f}"
                  f"{made['compression']:>8.1f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "preset": args.preset, "rows": rows}, indent=2) + "\n")


def _cut_corpus(model: str, lengths: str, folder: Path) -> list[Path]:
    lm = kvzip_cli.load_model(model)
    parsed = parse_lengths(lengths)
    check_lengths(lm, parsed)
    text, paths = corpus(), []
    for n in parsed:
        document, _ = document_of(text, lm, n)
        paths.append(folder / f"{n}.txt")
        paths[-1].write_text(document)
    return paths


if __name__ == "__main__":
    main()
