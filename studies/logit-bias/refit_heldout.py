"""Refit modes side by side, kld/top1 by probe set: the bench's reconstruction probes (close to the refit's own
reference queries), its general probes (summary, topic), and the held-out questions of examples/questions/.

    python studies/logit-bias/refit_heldout.py [--out FILE] [DOC ...]   (default: results/heldout-modes.json)

Refit modes: "bias" (values refit with a logit bias, kvc's default), "values" (values refit alone), "off".
"""
import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from kvzip_cli.attention import kvc_attention_in
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.settings import QuantOptions
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.document import read_document
from kvzip_cli.evaluation.evaluator import CacheUnderTest, Evaluator
from kvzip_cli.evaluation.probes import builtin_probes, read_probes
from kvzip_cli.load.loader import load
from kvzip_cli.models.loading import load_model
from kvzip_cli.prune.scoring import score_context

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples"  # the documents and their held-out questions
# (name, kept ratio, bits, codec, key bits)
SETTINGS = [("30% 16-bit", 0.3, 16, "zstd", None), ("30% 3-bit", 0.3, 3, "ans", None),
            ("25% 3-bit", 0.25, 3, "ans", None), ("small", 0.12, 2, "ans", 3)]
MODES = ("bias", "values", "off")


def refit(pruning, mode: str):
    if mode == "off":
        return replace(pruning, queries=None)
    return replace(pruning, logit_bias=mode == "bias")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", default=["apache-2.0", "mpl-2.0", "gpl-2"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "heldout-modes.json")
    args = parser.parse_args()
    lm = load_model("smollm2")
    out = {}
    for doc in args.docs:
        text = read_document(str(EXAMPLES / "docs" / f"{doc}.txt"))
        pre = prefill_document(text, lm)
        builtin = builtin_probes(text)
        sets = {"reconstruction": [p for p in builtin if p.kind == "reconstruction"],
                "general": [p for p in builtin if p.kind != "reconstruction"],
                "held-out": read_probes(EXAMPLES / "questions" / f"{doc}.txt")}
        evaluators = {k: Evaluator(lm, pre.layout, v, [], 32) for k, v in sets.items()}
        refs = {k: e.reference(CacheUnderTest(pre.cache, pre.tokens)) for k, e in evaluators.items()}
        scored = score_context(lm, pre.cache, pre.layout, "kvzip")
        with tempfile.TemporaryDirectory() as tmp:
            for name, ratio, bits, codec, key_bits in SETTINGS:
                for mode in MODES:
                    path = Path(tmp) / "x.kvc"
                    write_kvc(pre, path, codec=codec, bits=bits, pruning=refit(scored.keep(ratio), mode),
                              quant=QuantOptions(key_bits=key_bits))
                    with kvc_attention_in(lm.model):
                        kv = load(path, lm)
                        for k, e in evaluators.items():
                            m = e.evaluate(CacheUnderTest(kv.cache, pre.tokens), refs[k])
                            out.setdefault(f"{name} {mode} {k}", {})[doc] = (m["kld"], m["top1"])
                            print(doc, name, mode, k, f"kld {m['kld']:.4f} top1 {m['top1']:.3f}", flush=True)
        args.out.write_text(json.dumps(out, indent=2))
    print("MEAN")
    for key, by_doc in out.items():
        vals = list(by_doc.values())
        print(key, f"kld {sum(v[0] for v in vals) / len(vals):.4f} top1 {sum(v[1] for v in vals) / len(vals):.3f}")


if __name__ == "__main__":
    main()
