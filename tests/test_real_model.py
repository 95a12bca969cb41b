"""End to end on the embedded SmolLM2-135M-Instruct: a lossless .kvc answers exactly like the uncached model."""

import json
import subprocess
import sys

import pytest
import torch

from kvzip_cli import compress, load, load_model

from fixtures import DOCS, cached, uncached

pytestmark = pytest.mark.slow

CASES = {
    "apache-2.0.txt": ["What does this license say about patents?", "Who is the licensor?",
                       "Repeat the first sentence of the document."],
    "gpl-2.txt": ["Summarize the document in one sentence.", "Can I sell copies of the program?",
                  "What must accompany a distributed copy?"],
}


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def excerpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    paths = {}
    for name in CASES:
        path = folder / name
        path.write_text(DOCS.joinpath(name).read_text()[:10_000])  # about 2,000 tokens each
        paths[name] = path
    return paths


@pytest.mark.parametrize("name", list(CASES))
def test_lossless_answers_match_uncached_model(tmp_path, smol, excerpts, name):
    result = compress(excerpts[name], tmp_path / "doc.kvc", model=smol, preset="lossless", codec="zstd", bits=32)
    assert 1_500 < result.tokens < 3_000
    kv = load(tmp_path / "doc.kvc", smol)
    for question in CASES[name]:
        ids = kv.prompt_ids(smol.tokenizer, question)
        ref_tokens, ref_logits = uncached(smol, ids, 32)
        got_tokens, got_logits = cached(smol, kv, ids, 32)
        assert got_tokens == ref_tokens, question
        torch.testing.assert_close(got_logits, ref_logits, atol=1e-3, rtol=0)


def test_16bit_storage_is_near_lossless(tmp_path, smol, excerpts):
    from kvzip_cli.evaluation.metrics import FidelityTotals

    compress(excerpts["gpl-2.txt"], tmp_path / "doc.kvc", model=smol, preset="lossless", codec="zstd", bits=16)
    kv = load(tmp_path / "doc.kvc", smol)
    totals = FidelityTotals()
    n = kv.input_ids.shape[1]
    for question in CASES["gpl-2.txt"]:
        ids = kv.prompt_ids(smol.tokenizer, question)
        answer, _ = uncached(smol, ids, 32)
        forced = torch.cat([ids, torch.tensor([answer[:-1]])], dim=1)  # teacher-forced along the uncached answer
        with torch.inference_mode():
            ref_logits = smol.model(forced).logits[0, ids.shape[1] - 1 :]
            got_logits = smol.model(forced[:, n:], past_key_values=kv.cache).logits[0, ids.shape[1] - n - 1 :]
        kv.reset()
        totals.add_positions(ref_logits.log_softmax(-1), got_logits.log_softmax(-1), answer)
        # float16 storage of float32 KV: measured max |Δlogit| ≈ 0.016 on logits of magnitude ~20.
        assert (got_logits - ref_logits).abs().max() < 0.1, question
    summary = totals.summary()
    assert summary["kld"] < 1e-4 and summary["top1"] >= 0.98


def test_cli_end_to_end(tmp_path, smol, excerpts):
    out = tmp_path / "doc.kvc"
    question = CASES["apache-2.0.txt"][1]
    kvc = [sys.executable, "-m", "kvzip_cli"]
    done = subprocess.run([*kvc, "compress", str(excerpts["apache-2.0.txt"]), "-o", str(out), "--preset", "lossless",
                           "--bits", "32", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["tokens"] > 1_500 and out.stat().st_size == summary["file_bytes"]
    done = subprocess.run([*kvc, "load", str(out), "--prompt", question, "--max-new-tokens", "32", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model"] == "smollm2" and answer["prefill_seconds"] > answer["load_seconds"]
    ids = load(out, smol).prompt_ids(smol.tokenizer, question)
    with torch.inference_mode():
        reference = smol.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                        do_sample=False)[0, ids.shape[1]:]
    assert answer["answer"] == smol.tokenizer.decode(reference, skip_special_tokens=True).strip()


def test_bench_needles_found_in_lossless_cache(smol):
    from kvzip_cli.bench.runner import run_bench
    from kvzip_cli.bench.sweep import Setting

    text = DOCS.joinpath("gpl-2.txt").read_text()[:5000]
    sweep = [Setting("kvc 32-bit raw", "kvc lossless", "kvc", 1.0, 32, "raw")]
    result = run_bench(text, "gpl-2 excerpt", smol, sweep, [], new_tokens=8)
    row = result.rows[0]
    assert sum(result.reference.needle_hits) >= 2  # the full cache finds the planted keys
    assert row["needle"] == row["needle_full"]
    assert row["kld"] == 0.0 and row["top1"] == 1.0 and row["agreement"] == 1.0
