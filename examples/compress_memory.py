"""Peak memory of `kvc compress` against document length: one `kvc compress` process per length, its peak RSS
read from the kernel (wait4), so every figure is that process's own.

    python examples/compress_memory.py [--lengths 1k,2k,4k,8k] [--preset balanced] [--out results.json]

Documents are the example corpus concatenated (licences, no repetition) and cut to each length in tokens of the
embedded model, whose context ends at 8,192 positions.
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

DOCS = Path(__file__).parent / "docs"


def corpus() -> str:
    return "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.txt")))


def compress_peak(document: Path, output: Path, preset: str) -> tuple[dict, float, float]:
    """(kvc compress --json result, peak RSS in GiB, seconds) of one compress process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kvzip_cli", "compress", str(document), "-o", str(output),
                             "--preset", preset, "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"kvc compress failed on {document} (exit {proc.returncode})")
    return json.loads(stdout), usage.ru_maxrss / 2**20, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1k,2k,4k,8k")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lm = kvzip_cli.load_model("smollm2")
    lengths = parse_lengths(args.lengths)
    check_lengths(lm, lengths)
    text, rows = corpus(), []
    print(f"{'tokens':>7}{'peak RSS GiB':>14}{'seconds':>9}{'file MB':>9}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            document, _ = document_of(text, lm, n)
            path = Path(tmp) / f"{n}.txt"
            path.write_text(document)
            made, peak, seconds = compress_peak(path, Path(tmp) / f"{n}.kvc", args.preset)
            rows.append({"tokens": made["tokens"], "peak_rss_gib": peak, "seconds": seconds,
                         "file_bytes": made["file_bytes"]})
            print(f"{made['tokens']:>7}{peak:>14.2f}{seconds:>9.1f}{made['file_bytes'] / 1e6:>9.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
