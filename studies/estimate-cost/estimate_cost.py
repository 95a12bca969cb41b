"""What the loss estimate every file records costs `kvc compress`: the same documents compressed with the balanced
preset with and without it (`--no-estimate`), side by side in one run, one model load, after a warm-up compress
(the first one in a process pays one-time start-up costs); `estimate_seconds` is the estimate's own time as the
file's header records it.

    python studies/estimate-cost/estimate_cost.py [DOC ...] [--model smollm2] [--out studies/estimate-cost/results]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import kvzip_cli
from kvc_format import KvcReader
from kvzip_cli.compress.pipeline import compress_text
from kvzip_cli.document import read_document

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent.parent / "examples" / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("documents", nargs="*", type=Path,
                        default=[DOCS / "apache-2.0.txt", DOCS / "mpl-2.0.txt", DOCS / "gpl-3.txt"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    lm = kvzip_cli.load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        compress_text(read_document(str(args.documents[0]))[:4000], Path(tmp) / "warm-up.kvc", model=lm)
        for doc in args.documents:
            text = read_document(str(doc))
            row = {"document": doc.name}
            for estimate in (False, True):
                started = time.perf_counter()
                made = compress_text(text, Path(tmp) / "f.kvc", model=lm, estimate=estimate)
                row["with" if estimate else "without"] = round(time.perf_counter() - started, 2)
            with KvcReader(made.output) as reader:
                row["estimate_seconds"] = reader.header["timings"]["estimate_seconds"]
            row.update(tokens=made.tokens, top1=made.estimate["top1"], kld=made.estimate["kld"],
                       probes=made.estimate["probes"], overhead_seconds=round(row["with"] - row["without"], 2),
                       overhead=round(row["with"] / row["without"] - 1, 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.model}.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
