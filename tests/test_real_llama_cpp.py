"""llama.cpp answers from caches that kvc made and `python -m kvc_format export --to llama.cpp` converted: the real
runtime (node-llama-cpp 3.21.1's prebuilt llama.cpp, installed by `npm ci` in examples/edge) with the embedded
model's GGUF, against its own prefill of the same tokens. CI installs the runtime; there these tests never skip."""

import sys
from pathlib import Path

import pytest

from kvzip_cli import load_model
from kvzip_cli.compress.pipeline import compress_text
from kvzip_cli.document import question_ids
from kvzip_cli.models.files import embedded_gguf

from llama_cpp_runtime import require_llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "studies" / "edge"))  # llama_cpp_check.py
from llama_cpp_check import (  # noqa: E402
    compare,
    distance,
    export,
    probabilities,
    prompt_of,
    run_node,
    transformers_probabilities,
)

pytestmark = pytest.mark.slow
QUESTION = "Who is the licensor?"
# A few hundred tokens keep llama.cpp's prefill and answers to seconds on 2 cores.
TEXT = (Path(__file__).resolve().parent.parent / "examples" / "docs" / "apache-2.0.txt").read_text()[:1500]
SETTINGS = {
    "lossless": {"preset": "lossless"},
    "4-bit": {"ratio": 1.0, "bits": 4, "codec": "ans"},
    "position-0.5": {"ratio": 0.5, "scorer": "kvzip", "allocation": "position", "bits": 16, "codec": "zstd"},
}


@pytest.fixture(scope="module")
def runtime() -> Path:
    require_llama_cpp()
    return embedded_gguf()


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory, runtime, lm) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("llama-cpp")
    out = {}
    for name, options in SETTINGS.items():
        compress_text(TEXT, folder / f"{name}.kvc", model=lm, estimate=False, **options)  # the runtime is tested
        out[name] = folder / f"{name}.kvc"
    out["question_ids"] = question_ids(lm.tokenizer, "", prompt_of(out["lossless"])["question_suffix"], QUESTION)
    return out


@pytest.fixture(scope="module")
def answers(tmp_path_factory, runtime, files, lm) -> dict:
    """llama.cpp's runs (its prefill, then each exported state) compared with its prefill, and each state's
    distributions compared with transformers' from the same .kvc along the same answer (`"transformers"`)."""
    folder = tmp_path_factory.mktemp("states")
    states = {}
    for name in SETTINGS:
        states[name] = folder / f"{name}.state"
        export(files[name], states[name], runtime)
    done = run_node(runtime, prompt_of(files["lossless"]), QUESTION, states, folder / "out")
    assert done.returncode == 0, done.stderr
    result = compare(folder / "out")
    result["transformers"] = {
        name: distance(transformers_probabilities(lm, files[name], result["question_ids"], result["reference"]),
                       probabilities(folder / "out", name))
        for name in SETTINGS}
    return result


def test_llama_cpp_tokenizes_the_question_as_kvc_does(files, answers):
    assert answers["question_ids"] == files["question_ids"]


def test_llama_cpp_computes_what_transformers_computes_from_the_same_file(answers):
    # llama.cpp runs its Q4_1 weights directly, kvc's transformers model the same weights dequantized to float32:
    # measured kld 0.003-0.004 nats between the two on every setting (studies/edge/results/llama-cpp.md). A wrong
    # channel order, position or V layout costs far more than this bound.
    for name in SETTINGS:
        assert answers["transformers"][name]["kld"] <= 0.02 and answers["transformers"][name]["top1"] >= 0.85, name


def test_llama_cpp_answers_from_the_exported_caches_as_from_its_own_prefill(answers):
    runs = answers["runs"]
    for name in SETTINGS:
        assert runs[name]["seconds_to_ready"] < runs["prefill"]["seconds_to_ready"], name
    # Measured: kld 0.005 (lossless) and 0.008 (4-bit), top1 0.97 and 0.94; greedy answers agree on their first
    # words and part at a near-tie a few tokens in.
    assert runs["lossless"]["top1"] >= 0.9 and runs["lossless"]["kld"] <= 0.02
    assert runs["4-bit"]["top1"] >= 0.85 and runs["4-bit"]["kld"] <= 0.03
    assert runs["lossless"]["answer"].split()[:3] == runs["prefill"]["answer"].split()[:3]


def test_llama_cpp_refuses_a_state_for_another_context(tmp_path, runtime, files):
    state = tmp_path / "f16.state"
    export(files["lossless"], state, runtime)
    prompt = prompt_of(files["lossless"])
    no_flash = run_node(runtime, prompt, QUESTION, {"f16": state}, tmp_path / "a", flash_attention=False,
                        prefill=False)
    assert no_flash.returncode != 0 and "incompatible V transposition" in no_flash.stderr
    quantized = run_node(runtime, prompt, QUESTION, {"f16": state}, tmp_path / "b", kv_type="Q8_0", prefill=False)
    assert quantized.returncode != 0 and "mismatched key type" in quantized.stderr


def test_q8_0_and_transposed_exports_load_in_matching_contexts(tmp_path, runtime, files):
    prompt = prompt_of(files["lossless"])
    export(files["lossless"], tmp_path / "q8.state", runtime, "--cache-type", "q8_0")
    export(files["lossless"], tmp_path / "vt.state", runtime, "--no-flash-attn")
    q8 = run_node(runtime, prompt, QUESTION, {"q8_0": tmp_path / "q8.state"}, tmp_path / "q", kv_type="Q8_0")
    assert q8.returncode == 0, q8.stderr
    transposed = run_node(runtime, prompt, QUESTION, {"v_trans": tmp_path / "vt.state"}, tmp_path / "t",
                          flash_attention=False)
    assert transposed.returncode == 0, transposed.stderr
    # Against a q8_0-context prefill, whose own cache is rounded too: measured top1 0.885 over 26 positions.
    assert compare(tmp_path / "q")["runs"]["q8_0"]["top1"] >= 0.8
    assert compare(tmp_path / "t")["runs"]["v_trans"]["top1"] >= 0.9
