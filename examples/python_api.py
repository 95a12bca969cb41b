"""Compress a document once (a preset: balanced keeps 25% of the KV, refit, 3-bit, entropy-coded), then answer several
questions with `model.generate`.

    python examples/python_api.py [DOC] [PRESET]
"""

import sys
import tempfile
from pathlib import Path

import torch

import kvzip_cli

doc = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent / "docs" / "apache-2.0.txt")
preset = sys.argv[2] if len(sys.argv) > 2 else "balanced"  # or "lossless", "small"
questions = ["Who is the licensor?", "What does the license say about patents?", "Can I redistribute the work?"]

lm = kvzip_cli.load_model("smollm2")  # the embedded SmolLM2-135M-Instruct, no network needed
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "doc.kvc"
    made = kvzip_cli.compress(doc, path, model=lm, preset=preset)  # ratio=, bits=, codec=, scorer= override it
    print(f"compressed {made.tokens} tokens, kept {made.kept_ratio:.0%} of the KV, into {made.file_bytes / 1e6:.1f} MB "
          f"({made.compression:.1f}x) in {made.seconds:.1f} s")

    kv = kvzip_cli.load(path, lm.model, lm.tokenizer)  # a pruned file switches the model to kvc's attention
    print(f"{made.bits}-bit {made.codec}: {made.bits_per_element:.2f} bits per kept element")
    print(f"loaded in {kv.load_seconds:.2f} s (prefill took {made.prefill_seconds:.2f} s)\n")
    for question in questions:
        ids = kv.prompt_ids(lm.tokenizer, question)  # cached document tokens + the question's tokens
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=kv.cache,
                                max_new_tokens=48, do_sample=False)
        print(f"Q: {question}\nA: {lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}\n")
        kv.reset()  # generate appended the question and answer; drop them before the next question
