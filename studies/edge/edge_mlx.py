"""Answer from a `.kvc` in MLX-LM and compare with MLX-LM's own cache of the same tokens. Torch-free: run it with the
python of a venv holding `kvc_format` (`pip install ./format`) and mlx-lm:

    python studies/edge/edge_mlx.py --model FOLDER --question Q [--question Q ...] [--dtype float16 ...] FILE.kvc ...

For each file, dtype and question (the question laid out as the file's header says: prompt.question_prefix +
question + prompt.question_suffix, tokenized without special tokens), T greedy tokens (--tokens, default 32) from
  cache     export_mlx → load_prompt_cache → generate_step over the question tokens
  prefill   MLX-LM's own prefill of prompt.prefix_ids (generate_step with max_tokens=0 into a fresh cache, as
            mlx_lm.cache_prompt does; once per document, trimmed back after each question) → generate_step over
            the same question tokens
and their agreement: the answers' common prefix / T, whether they are equal, and top1: teacher-forced along the
prefill answer, the fraction of its T steps at which the logits over the exported cache pick the same token.
Prints one JSON object (also written to --json FILE); a line per row on stderr as it goes.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, trim_prompt_cache

from kvc_format import KvcReader, export_mlx


def greedy(model, prompt: list[int], cache, tokens: int) -> list[int]:
    return [int(token) for token, _ in generate_step(mx.array(prompt), model, max_tokens=tokens, prompt_cache=cache)]


def teacher_forced_top1(model, cache, question: list[int], answer: list[int]) -> float:
    """Fraction of the answer's steps at which the logits over `cache` + question + answer[:-1] pick answer[i]."""
    logits = model(mx.array([question + answer[:-1]]), cache=cache)[0, len(question) - 1 :]
    return float(mx.mean(mx.argmax(logits, axis=-1) == mx.array(answer)).item())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class OwnPrefill:
    """MLX-LM's own cache of one prefix at a time, and its answers."""

    def __init__(self, model):
        self.model, self.prefix, self.cache, self.seconds, self.answers = model, None, None, 0.0, {}

    def answer(self, prefix: list[int], question: list[int], tokens: int) -> dict:
        key = (tuple(prefix), tuple(question))
        if key not in self.answers:
            if self.prefix != prefix:
                started = time.perf_counter()
                self.prefix, self.cache = prefix, make_prompt_cache(self.model)
                for _ in generate_step(mx.array(prefix), self.model, max_tokens=0, prompt_cache=self.cache):
                    pass
                mx.eval([c.state for c in self.cache])
                self.seconds = time.perf_counter() - started
            answer = greedy(self.model, question, self.cache, tokens)
            trim_prompt_cache(self.cache, self.cache[0].offset - len(prefix))
            self.answers[key] = {"ids": answer, "prefix_seconds": self.seconds}
        return self.answers[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help=".kvc files (every token of every head kept); a document's together")
    parser.add_argument("--model", required=True, help="the model folder MLX-LM loads (the .kvc's model)")
    parser.add_argument("--question", action="append", required=True)
    parser.add_argument("--dtype", action="append", choices=("float16", "float32"), help="export dtype(s), float16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    model, tokenizer = mlx_lm.load(args.model)
    own, rows = OwnPrefill(model), []
    with tempfile.TemporaryDirectory() as tmp:
        for file in args.files:
            with KvcReader(file) as reader:
                prompt, settings = reader.header["prompt"], reader.header["settings"]
            for dtype in args.dtype or ["float16"]:
                cache_file = str(Path(tmp) / "cache.safetensors")
                started = time.perf_counter()
                size = export_mlx(file, cache_file, dtype=dtype, model=args.model)
                export_seconds = time.perf_counter() - started
                for question in args.question:
                    q_ids = tokenizer.encode(prompt["question_prefix"] + question + prompt["question_suffix"],
                                             add_special_tokens=False)
                    reference = own.answer(prompt["prefix_ids"], q_ids, args.tokens)
                    started = time.perf_counter()
                    cache = load_prompt_cache(cache_file)
                    mx.eval([c.state for c in cache])
                    load_seconds = time.perf_counter() - started
                    answer = greedy(model, q_ids, cache, args.tokens)
                    top1 = teacher_forced_top1(model, load_prompt_cache(cache_file), q_ids, reference["ids"])
                    rows.append({
                        "file": str(file), "bits": settings.get("bits"), "tokens": len(prompt["prefix_ids"]),
                        "dtype": dtype, "question": question, "question_tokens": len(q_ids),
                        "agreement": common_prefix(answer, reference["ids"]) / args.tokens,
                        "exact": answer == reference["ids"], "top1": top1,
                        "mlx_bytes": size, "export_seconds": round(export_seconds, 3),
                        "load_seconds": round(load_seconds, 3),
                        "prefill_seconds": round(reference["prefix_seconds"], 3),
                        "cache_answer": tokenizer.decode(answer), "prefill_answer": tokenizer.decode(reference["ids"]),
                        "cache_ids": answer, "prefill_ids": reference["ids"],
                    })
                    print(json.dumps({k: rows[-1][k] for k in ("file", "dtype", "question", "agreement", "exact",
                                                               "top1")}), file=sys.stderr, flush=True)
    runtime = f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}"
    result = {"model": args.model, "runtime": runtime, "tokens": args.tokens, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
