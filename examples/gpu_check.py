"""Check and time kvc's GPU path in one short run (a few minutes of GPU time).

    python examples/gpu_check.py [--device cuda] [--lengths 1k,2k,4k,8k] [--out gpu_check.json]

1. Correctness: a document compressed on the device (prefill and KVzip scoring in bfloat16) is loaded both on the
   device and on the CPU in float32; every layer's keys and values must agree to bfloat16 precision, and the greedy
   answers of both are printed side by side.
2. Decoders: the same file loaded on the device with the numpy decoder (CPU, then copied) and the triton decoder
   (rANS and dequantization in Triton kernels on the device): the caches must agree to float32 rounding (the GPU
   may fuse a multiply-add), and both loads are timed (median of 3, after one warm-up that compiles the kernels).
3. Timing: `kvc bench --lengths` on the device: time to first token from a `balanced` .kvc against re-prefilling,
   with compress, load and decode throughput, and the peak device memory.

`--device cpu` runs the same checks on the CPU (how this script is tested where no GPU is at hand); there, the
triton decoder runs only under TRITON_INTERPRET=1, slowly, and `--skip-triton` leaves it out.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import kvzip_cli
from kvzip_cli.bench.lengths import as_json, check_lengths, document_of, parse_lengths, run_lengths
from kvzip_cli.bench.lengths_report import print_lengths
from kvzip_cli.load import kernels
from kvzip_cli.load.answer import ask
from kvzip_cli.load.pruned_cache import PrunedCache

DOCS = Path(__file__).parent / "docs"
QUESTIONS = ("Who is the licensor?", "What must a redistribution include?")
MAX_RELATIVE_ERROR = 0.02  # bfloat16 keeps 8 bits of mantissa: about 0.4% per element
MAX_DECODER_DIFFERENCE = 1e-6  # relative: the same float32 arithmetic, give or take a fused multiply-add


def layer_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer as float32 on the CPU, pruned heads concatenated."""
    out = []
    for layer in cache.layers:
        if isinstance(cache, PrunedCache):
            keys = torch.cat([k[0] for k in layer.context_keys])
            values = torch.cat([v[0] for v in layer.context_values])
        else:
            keys, values = layer.keys[0], layer.values[0]
        out.append((keys.float().cpu(), values.float().cpu()))
    return out


def check_correctness(device_lm, cpu_lm, text: str, folder: Path) -> dict:
    path = folder / "check.kvc"
    started = time.perf_counter()
    made = kvzip_cli.compress_text(text, path, model=device_lm, preset="balanced")
    compress_seconds = time.perf_counter() - started
    on_device, on_cpu = kvzip_cli.load(path, device_lm), kvzip_cli.load(path, cpu_lm)
    worst = 0.0
    for (dk, dv), (ck, cv) in zip(layer_tensors(on_device.cache), layer_tensors(on_cpu.cache), strict=True):
        for got, want in ((dk, ck), (dv, cv)):
            worst = max(worst, float((got - want).norm() / want.norm()))
    answers = []
    for question in QUESTIONS:
        device_answer = ask(device_lm.model, device_lm.tokenizer, on_device, question, 24).text
        cpu_answer = ask(cpu_lm.model, cpu_lm.tokenizer, on_cpu, question, 24).text
        answers.append({"question": question, "device": device_answer, "cpu": cpu_answer})
    return {"tokens": made.tokens, "compression": made.compression, "compress_seconds": compress_seconds,
            "prefill_seconds": made.prefill_seconds, "score_seconds": made.score_seconds,
            "worst_relative_error": worst, "answers": answers}


def compare_decoders(device_lm, text: str, folder: Path) -> dict:
    """Load one balanced file with each decoder on the device: how far apart the caches are, and how long each takes."""
    path = folder / "decoders.kvc"
    kvzip_cli.compress_text(text, path, model=device_lm, preset="balanced")
    caches, seconds = {}, {}
    for decoder in ("numpy", "triton"):
        kvzip_cli.load(path, device_lm, decoder=decoder)  # warm-up: Triton compiles its kernels on first use
        runs = [kvzip_cli.load(path, device_lm, decoder=decoder) for _ in range(3)]
        caches[decoder] = layer_tensors(runs[0].cache)
        seconds[decoder] = statistics.median(kv.load_seconds for kv in runs)
    worst = 0.0
    for (nk, nv), (tk, tv) in zip(caches["numpy"], caches["triton"], strict=True):
        for got, want in ((tk, nk), (tv, nv)):
            worst = max(worst, float((got - want).norm() / want.norm()))
    return {"load_seconds": seconds, "worst_relative_difference": worst,
            "speedup": seconds["numpy"] / seconds["triton"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", default="1k,2k,4k,8k")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-triton", action="store_true", help="leave out the decoder comparison")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu to check the script itself")
    device_lm = kvzip_cli.load_model("smollm2", device=args.device)
    cpu_lm = kvzip_cli.load_model("smollm2", device="cpu")
    lengths = parse_lengths(args.lengths)
    check_lengths(device_lm, lengths)
    corpus = "\n\n".join(p.read_text() for p in sorted(DOCS.glob("*.txt")))
    decoders = None
    with tempfile.TemporaryDirectory() as tmp:
        correctness = check_correctness(device_lm, cpu_lm, document_of(corpus, cpu_lm, 2000)[0], Path(tmp))
        print(f"correctness on {args.device} ({device_lm.model.dtype}) against the CPU (float32): worst relative "
              f"K/V error {correctness['worst_relative_error']:.4f} (limit {MAX_RELATIVE_ERROR})")
        for a in correctness["answers"]:
            print(f"  {a['question']}\n    {args.device}: {a['device']}\n    cpu: {a['cpu']}")
        if not args.skip_triton and not kernels.available(device_lm.model.device):
            print("triton decoder comparison skipped: Triton cannot run here (pip install 'kvc[gpu]' on a CUDA "
                  "machine; TRITON_INTERPRET=1 on the CPU)")
        elif not args.skip_triton:
            decoders = compare_decoders(device_lm, document_of(corpus, cpu_lm, max(lengths))[0], Path(tmp))
            print(f"decoders at {max(lengths):,} tokens: numpy {decoders['load_seconds']['numpy']:.3f} s, triton "
                  f"{decoders['load_seconds']['triton']:.3f} s ({decoders['speedup']:.1f}x); caches differ by "
                  f"{decoders['worst_relative_difference']:.1e} (limit {MAX_DECODER_DIFFERENCE})")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rows, notes = run_lengths(corpus, device_lm, lengths, "balanced")
    timing = as_json(rows, notes, device_lm, "balanced", "examples/docs/*.txt concatenated")
    if args.device.startswith("cuda"):
        timing["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2**30
        timing["gpu"] = torch.cuda.get_device_name()
    print_lengths(timing)
    if args.out:
        args.out.write_text(json.dumps({"correctness": correctness, "decoders": decoders, "timing": timing},
                                       indent=2) + "\n")
    if correctness["worst_relative_error"] > MAX_RELATIVE_ERROR:
        sys.exit(f"FAILED: the {args.device} cache differs from the CPU cache by "
                 f"{correctness['worst_relative_error']:.4f}")
    if decoders and decoders["worst_relative_difference"] > MAX_DECODER_DIFFERENCE:
        sys.exit(f"FAILED: the triton and numpy decoders differ by {decoders['worst_relative_difference']:.1e}")


if __name__ == "__main__":
    main()
