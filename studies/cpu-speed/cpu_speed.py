"""Load and answer speed on the CPU, this checkout against an earlier commit, side by side in one run.

    python studies/cpu-speed/cpu_speed.py FILE.kvc ... [--against REV] [--rounds 3] [--tokens 64] [--busy N]
                                          [--json OUT]

For every .kvc file and each code version (REV, checked out into a temporary worktree, and this working tree, run
alternately in child processes so both see the same machine load): `kvc load` time (file → cache ready, median of
the rounds), the torch-free reader's decode alone (float16 MB/s of output, rANS symbols/s), and seconds per
generated token over a fixed number of greedy tokens (EOS suppressed so every run decodes the same count).
`--busy N` keeps N other processes spinning on the CPU meanwhile: a loaded machine.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the working tree measured as "new"

# Runs inside a child: import kvzip_cli and kvc_format from SOURCE (the editable install's finder is dropped).
CHILD = r"""
import json, statistics, sys, time
source, rounds, tokens, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
sys.meta_path = [f for f in sys.meta_path if "editable" not in (type(f).__module__ + type(f).__name__).lower()]
sys.path.insert(0, source)
import importlib.util
spec = importlib.util.spec_from_file_location("kvc_format", f"{source}/format/__init__.py",
                                              submodule_search_locations=[f"{source}/format"])
kvc_format = importlib.util.module_from_spec(spec)
sys.modules["kvc_format"] = kvc_format
spec.loader.exec_module(kvc_format)
import torch
import kvzip_cli
assert kvzip_cli.__file__.startswith(source), kvzip_cli.__file__
from kvzip_cli import load, load_model  # public names: the same in both versions, whatever their modules
lm = load_model("smollm2")
for name in ("quantized", "rans"):
    if hasattr(getattr(kvc_format, name), "warm_up"):
        getattr(kvc_format, name).warm_up()
        break
rows = []
for path in files:
    with kvc_format.KvcReader(path) as reader:
        g = reader.geometry
        symbols = 2 * sum(reader.kept_per_layer()) * g.head_dim if g.layout == "quantized" else 0
    loads, decodes = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        with kvc_format.KvcReader(path) as reader:
            out = sum(s.keys.data.size + s.values.data.size for _, s in reader.iter_layers())
        decodes.append(time.perf_counter() - started)
        loads.append(load(path, lm).load_seconds)
    kv = load(path, lm)
    ids = kv.prompt_ids(lm.tokenizer, "What does the license say about patents?")
    per_token = []
    for _ in range(rounds):
        with torch.inference_mode():
            started = time.perf_counter()
            lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=kv.cache,
                              max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              pad_token_id=lm.tokenizer.eos_token_id)
            per_token.append((time.perf_counter() - started) / tokens)
        kv.reset()
    decode = statistics.median(decodes)
    rows.append({"file": path, "tokens": g.tokens, "load_seconds": statistics.median(loads),
                 "decode_seconds": decode, "decode_mb_per_s": 2 * out / decode / 1e6,
                 "symbols_per_s": symbols / decode if symbols else None,
                 "seconds_per_token": statistics.median(per_token), "cache_bytes": kv.cache_bytes()})
print(json.dumps(rows))
"""


def measure(source: Path, files: list[str], rounds: int, tokens: int) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(source), str(rounds), str(tokens), *files],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"measuring {source} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--against", default="HEAD", help="the earlier commit (default: HEAD)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU while measuring")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    files = [str(Path(f).resolve()) for f in args.files]
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against], check=True,
                       capture_output=True)
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            results = {"old": [], "new": []}
            for f in files:  # alternate, so that both versions see the same machine load
                results["old"] += measure(old, [f], args.rounds, args.tokens)
                results["new"] += measure(ROOT, [f], args.rounds, args.tokens)
        finally:
            for spinner in spinners:
                spinner.kill()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    print(f"{'file':<24}{'tokens':>7}  {'load s':>13}  {'reader MB/s':>13}  {'Msymbols/s':>13}  {'s/token':>13}")
    print(f"{'':<31}" + "  ".join(f"{'old':>6} {'new':>6}" for _ in range(4)))
    for o, n in zip(results["old"], results["new"], strict=True):
        sym = [f"{r['symbols_per_s'] / 1e6:6.1f}" if r["symbols_per_s"] else f"{'-':>6}" for r in (o, n)]
        print(f"{Path(o['file']).name:<24}{o['tokens']:>7}  {o['load_seconds']:6.3f} {n['load_seconds']:6.3f}  "
              f"{o['decode_mb_per_s']:6.0f} {n['decode_mb_per_s']:6.0f}  {sym[0]} {sym[1]}  "
              f"{o['seconds_per_token']:6.3f} {n['seconds_per_token']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"against": args.against, "busy": args.busy, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
