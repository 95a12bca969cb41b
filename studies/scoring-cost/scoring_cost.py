"""Time and peak memory of the prefill and of each scorer on one long document (the example corpus, concatenated).

    python studies/scoring-cost/scoring_cost.py [--tokens 16384] [--scorers kvzip,compactor]

SmolLM2-135M is trained on 8,192 positions; for longer documents the script raises the model's position limit,
so the answers would degrade, but time and memory (what this measures) are those of a real run of that length.
"""

import argparse
import resource
import time
from pathlib import Path

from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.load.pruned_cache import cache_bytes
from kvzip_cli.models.loading import load_model
from kvzip_cli.prune.scoring import score_context

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--scorers", default="kvzip,compactor")
    args = parser.parse_args()
    lm = load_model("smollm2")
    corpus = "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.txt")))
    ids = lm.tokenizer(corpus, add_special_tokens=False).input_ids[: args.tokens - 64]
    text = lm.tokenizer.decode(ids)
    config = lm.model.config
    config.max_position_embeddings = max(config.max_position_embeddings, args.tokens + 4096)
    print(f"model loaded, peak RSS {peak_rss_mb():,.0f} MB")
    pre = prefill_document(text, lm)
    kv_mb = cache_bytes(pre.cache) / 1e6
    print(f"prefill of {pre.tokens} tokens: {pre.prefill_seconds:.1f} s, KV cache {kv_mb:,.0f} MB, "
          f"peak RSS {peak_rss_mb():,.0f} MB")
    for name in args.scorers.split(","):
        scored = score_context(lm, pre.cache, pre.layout, name)
        print(f"{name}: {scored.seconds:.1f} s = {scored.seconds / pre.prefill_seconds:.2f}x prefill, "
              f"peak RSS so far {peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
