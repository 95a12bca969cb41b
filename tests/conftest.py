"""Shared fixtures: tiny random-weight Qwen2 / Llama models with a small BPE tokenizer trained in-process.

These are for fast unit tests of the mechanics only; claims about quality use the embedded SmolLM2 model.
"""

import os

# Triton's kernels (kvzip_cli.kernels) run on the CPU under its interpreter in tests. Triton reads this when it is
# first imported, which torch or transformers may do before any test module.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from kvzip_cli import LoadedModel

DOCS = Path(__file__).resolve().parent.parent / "examples" / "docs"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([p.read_text() for p in sorted(DOCS.glob("*.txt"))], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return _train_tokenizer()


def tiny_fields(tokenizer, initializer_range: float) -> dict:
    """The config fields every tiny model shares: 3 layers, hidden 64, 4 query heads over 2 KV heads."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )


def tiny_model(arch: str, tokenizer, seed: int = 0, initializer_range: float = 0.02) -> LoadedModel:
    torch.manual_seed(seed)
    common = tiny_fields(tokenizer, initializer_range)
    classes = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "llama": (LlamaForCausalLM, LlamaConfig)}
    model_class, config_class = classes[arch]
    model = model_class(config_class(**common)).eval()
    return LoadedModel(model, tokenizer, f"tiny-{arch}")


@pytest.fixture(params=["qwen2", "llama"])
def tiny(request, tiny_tokenizer) -> LoadedModel:
    return tiny_model(request.param, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama saved as a model folder, for driving the CLI with --model <folder>."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", tiny_tokenizer)
    lm.model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def short_doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "short.txt"
    path.write_text(DOCS.joinpath("apache-2.0.txt").read_text()[:3000])
    return path
