"""Measure, side by side in one run: prefill time of a document vs load time of its .kvc, and file sizes.

    python studies/load-vs-prefill/load_vs_prefill.py [DOC ...]   (default: the 2k- and 8k-token example documents)

Each document is stored with every preset (and lossless with the raw codec). Load time is file → cache ready
(median of 3); prefill is the model's chunked prefill when the file was made.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import kvzip_cli

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"
SETTINGS = {"lossless raw": {"preset": "lossless", "codec": "raw"}, "lossless": {"preset": "lossless"},
            "balanced": {"preset": "balanced"}, "small": {"preset": "small"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", type=Path, default=[DOCS / "apache-2.0.txt", DOCS / "gpl-3.txt"])
    args = parser.parse_args()
    lm = kvzip_cli.load_model("smollm2")
    print(f"{'document':<16}{'tokens':>7}{'setting':>14}{'fp16 MB':>9}{'file MB':>9}{'ratio':>7}"
          f"{'prefill s':>11}{'load s':>8}{'speedup':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for doc in args.docs:
            for label, options in SETTINGS.items():
                path = Path(tmp) / "doc.kvc"
                made = kvzip_cli.compress(str(doc), path, model=lm, **options)
                load = statistics.median(kvzip_cli.load(path, lm).load_seconds for _ in range(3))
                print(f"{doc.name:<16}{made.tokens:>7}{label:>14}{made.raw_bytes / 1e6:>9.1f}"
                      f"{made.file_bytes / 1e6:>9.1f}{made.compression:>7.2f}{made.prefill_seconds:>11.2f}"
                      f"{load:>8.3f}{made.prefill_seconds / load:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
