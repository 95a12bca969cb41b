"""The tokenizers kvc builds from the two real GGUF models (SmolLM2's byte-level BPE, Gemma 3's SentencePiece
vocabulary) give llama.cpp's token ids (node-llama-cpp 3.21.1's prebuilt llama.cpp, examples/edge/tokenize.mjs), on
long real documents and on what tokenizers get wrong: code, digits, runs of spaces and newlines, accents, CJK,
emoji, HTML and control-token text. CI installs the runtime; there these tests never skip."""

import json
import subprocess
from pathlib import Path

import pytest

from kvzip_cli import load_model
from kvzip_cli.models.files import packaged_gguf

from fixtures import DOCS
from llama_cpp_runtime import EDGE, require_llama_cpp

pytestmark = pytest.mark.slow
SAMPLES = [
    "The capital of France is",
    "Question: What is the largest planet in the solar system?\nAnswer:",
    "def f(x):\n    return x**2  # squares\n\n\tif x >= 10_000: print(f'{x:>8}')\n",
    "for (int i = 0; i < n; ++i) {\n\t\tsum += a[i] * b[i];\n}\n",
    "1234567890 3.14159 2026-12-07 0x1F 1,000,000 $12.50 99% 007 ½ ² ٣",
    "a  b   c    d\n\n\n\ne\t\tf \n \n  \n" + " " * 40 + "x" + "\n" * 40 + "y",
    "   leading spaces and trailing   ",
    "café naïve résumé Ærøskøbing Straße façade über ĳ Ω",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 😀👍🏽🇫🇷 family 👨‍👩‍👧‍👦 ✨",
    "<td>cell</td> <b>bold</b> </s> <eos> <start_of_turn>user <|im_start|>assistant<|im_end|>",
    "ａｂｃ　全角 ﬁ ligature \u00a0nbsp\u200bzwsp \u2028 \r\n windows",
    "",
]
DOCUMENTS = ["apache-2.0.txt", "long/e2fsprogs-news.txt", "long/dbus-news.txt", "long/python-special-methods.txt"]


@pytest.fixture(scope="module")
def node() -> str:
    return require_llama_cpp()


def llama_cpp_ids(node: str, gguf: Path, texts: list[str], folder: Path) -> dict[str, list[list[int]]]:
    (folder / "texts.json").write_text(json.dumps(texts))
    done = subprocess.run([node, str(EDGE / "tokenize.mjs"), str(gguf), str(folder / "texts.json"),
                           str(folder / "ids.json")], capture_output=True, text=True, cwd=EDGE, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads((folder / "ids.json").read_text())


@pytest.mark.parametrize("alias", ["smollm2", "gemma3"])
def test_token_ids_equal_llama_cpps(tmp_path, node, alias):
    texts = SAMPLES + [DOCS.joinpath(name).read_text() for name in DOCUMENTS]
    tokenizer = load_model(alias, device="cpu").tokenizer
    want = llama_cpp_ids(node, packaged_gguf(alias), texts, tmp_path)
    for i, text in enumerate(texts):
        # llama.cpp leaves control-token text as text unless asked to parse it; transformers parses it unless told
        # to split it (kvc lays out chat templates by parsing it)
        as_text = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
        parsed = tokenizer(text, add_special_tokens=False).input_ids
        assert as_text == want["text"][i], (alias, i, text[:60])
        assert parsed == want["special"][i], (alias, i, text[:60])
    long = [len(ids) for ids in want["text"][len(SAMPLES) + 1 :]]
    assert min(long) > (15_000 if alias == "gemma3" else 14_000)  # the long documents really are long


def test_gemma3_counts_what_llama_cpp_counts_and_adds_bos():
    """What the issue measured: "The capital of France is" is 6 ids with llama.cpp's BOS (transformers' own
    conversion of this GGUF gave 11), and the document prefix starts with BOS as the GGUF says."""
    tokenizer = load_model("gemma3", device="cpu").tokenizer
    assert tokenizer("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    smol = load_model("smollm2", device="cpu").tokenizer
    assert smol("The capital of France is").input_ids == smol("The capital of France is",
                                                               add_special_tokens=False).input_ids  # no BOS
