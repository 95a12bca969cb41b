"""The logit bias study's methods judged by probe set: the bench's reconstruction probes (close to the reference
queries that the bias and the refit are fitted to), its general probes (summary, topic) and the held-out questions of
examples/questions/, all 16-bit, so that only the fit differs.

    python examples/logit_bias_heldout.py [DOC ...]     (document names; default apache-2.0 mpl-2.0 gpl-2)

Writes examples/results/logit-bias/heldout.json.
"""

import json
import sys
from pathlib import Path

import torch
from logit_bias_study import evaluate, fitted_layers

from kvzip_cli.attention import kvc_attention_in
from kvzip_cli.bench.evaluate import CacheUnderTest, Evaluator
from kvzip_cli.bench.probes import builtin_probes, read_probes
from kvzip_cli.cache_file import prefill_document
from kvzip_cli.document import read_document
from kvzip_cli.models import load_model
from kvzip_cli.pruning import score_context

ROOT = Path(__file__).parent
SETTINGS = [(m, r) for r in (0.3, 0.2) for m in ("refit", "bias")]


def main() -> None:
    torch.set_num_threads(2)
    lm = load_model("smollm2")
    out: dict = {}
    for doc in sys.argv[1:] or ["apache-2.0", "mpl-2.0", "gpl-2"]:
        text = read_document(str(ROOT / "docs" / f"{doc}.txt"))
        pre = prefill_document(text, lm)
        builtin = builtin_probes(text)
        sets = {"reconstruction": [p for p in builtin if p.kind == "reconstruction"],
                "general": [p for p in builtin if p.kind != "reconstruction"],
                "held-out": read_probes(ROOT / "questions" / f"{doc}.txt")}
        evaluators = {k: Evaluator(lm, pre.layout, v, [], 32) for k, v in sets.items()}
        references = {k: e.reference(CacheUnderTest(pre.cache, pre.tokens)) for k, e in evaluators.items()}
        with kvc_attention_in(lm.model):
            scored = score_context(lm, pre.cache, pre.layout, "kvzip")
        for method, ratio in SETTINGS:
            layers = fitted_layers(method, scored.keep(ratio), pre)
            for name, evaluator in evaluators.items():
                metrics = evaluate(lm, pre, evaluator, references[name], layers)
                label = f"{method} {ratio:g} {name}"
                out.setdefault(label, {})[doc] = [metrics["kld"], metrics["top1"]]
                print(doc, label, f"kld {metrics['kld']:.4f} top1 {metrics['top1']:.3f}", flush=True)
        (ROOT / "results" / "logit-bias" / "heldout.json").write_text(json.dumps(out, indent=2))
    print("mean over the documents")
    for label, by_doc in out.items():
        values = list(by_doc.values())
        print(label, f"kld {sum(v[0] for v in values) / len(values):.4f}",
              f"top1 {sum(v[1] for v in values) / len(values):.3f}")


if __name__ == "__main__":
    main()
