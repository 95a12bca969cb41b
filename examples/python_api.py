"""Compress a document once, then answer questions from the file. Run it from the repository root:

    python examples/python_api.py

The README's "Python API" block is this program (tests/test_readme_python.py runs it). A few minutes on
2 CPU cores, most of it the compression; it writes apache.kvc in the current folder.
"""

import torch

import kvzip_cli

lm = kvzip_cli.load_model("smollm2")  # the embedded SmolLM2-135M-Instruct: no network needed

# Prefill the document once, score and prune it, quantize it: the slow part (progress on stderr).
made = kvzip_cli.compress("examples/docs/apache-2.0.txt", "apache.kvc", model=lm, progress=True)
print(f"{made.tokens:,} tokens -> {made.file_bytes / 1e6:.1f} MB, {made.compression:.1f}x smaller than the fp16 cache")

# Load the file (fast) and ask: ask() appends the question to the cached document and decodes greedily.
kv = kvzip_cli.load("apache.kvc", lm.model, lm.tokenizer)
answer = kvzip_cli.ask(lm.model, lm.tokenizer, kv, "Who is the licensor?", max_new_tokens=48)
print("Q: Who is the licensor?\nA:", answer.text)

# Or generate yourself: the cache is an ordinary transformers cache.
ids = kv.prompt_ids(lm.tokenizer, "Can I redistribute the work?")  # the document's ids + the question's
out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=kv.cache,
                        max_new_tokens=48, do_sample=False)
text = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
print("Q: Can I redistribute the work?\nA:", text)
kv.reset()  # generate appended the question and its answer to the cache: drop them before the next question
