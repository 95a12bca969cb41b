"""Refit on/off, kld/top1 by probe set: the bench's reconstruction probes (close to the refit's own reference
queries), its general probes (summary, topic), and the held-out questions of examples/questions/."""
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from kvzip_cli.attention import kvc_attention_in
from kvzip_cli.bench.evaluate import CacheUnderTest, Evaluator
from kvzip_cli.bench.probes import builtin_probes, read_probes
from kvzip_cli.cache_file import QuantOptions, prefill_document, write_kvc
from kvzip_cli.document import read_document
from kvzip_cli.load import load
from kvzip_cli.models import load_model
from kvzip_cli.pruning import score_context

ROOT = Path(__file__).parent
lm = load_model("smollm2")
settings = [("30% 16-bit", 0.3, 16, "zstd", None), ("balanced", 0.3, 3, "ans", None), ("small", 0.12, 2, "ans", 3)]
out = {}
for doc in ("apache-2.0", "mpl-2.0", "gpl-2"):
    text = read_document(str(ROOT / "docs" / f"{doc}.txt"))
    pre = prefill_document(text, lm)
    builtin = builtin_probes(text)
    sets = {"reconstruction": [p for p in builtin if p.kind == "reconstruction"],
            "general": [p for p in builtin if p.kind != "reconstruction"],
            "held-out": read_probes(ROOT / "questions" / f"{doc}.txt")}
    evaluators = {k: Evaluator(lm, pre.layout, v, [], 32) for k, v in sets.items()}
    refs = {k: e.reference(CacheUnderTest(pre.cache, pre.tokens)) for k, e in evaluators.items()}
    scored = score_context(lm, pre.cache, pre.layout, "kvzip")
    with tempfile.TemporaryDirectory() as tmp:
        for name, ratio, bits, codec, key_bits in settings:
            for refit in (True, False):
                pruning = scored.keep(ratio)
                if not refit:
                    pruning = replace(pruning, queries=None)
                path = Path(tmp) / "x.kvc"
                write_kvc(pre, path, codec=codec, bits=bits, pruning=pruning, quant=QuantOptions(key_bits=key_bits))
                with kvc_attention_in(lm.model):
                    kv = load(path, lm)
                    for k, e in evaluators.items():
                        m = e.evaluate(CacheUnderTest(kv.cache, pre.tokens), refs[k])
                        label = f"{name} {'refit' if refit else 'no-refit'} {k}"
                        out.setdefault(label, []).append((m["kld"], m["top1"]))
                        print(doc, label, f"kld {m['kld']:.4f} top1 {m['top1']:.3f}", flush=True)
print("MEAN")
for key, vals in out.items():
    print(key, f"kld {sum(v[0] for v in vals)/len(vals):.4f} top1 {sum(v[1] for v in vals)/len(vals):.3f}")
(ROOT / "results" / "refit" / "heldout.json").write_text(json.dumps(out, indent=2))
