"""What the tests share besides pytest fixtures (conftest.py): the tiny models and their tokenizer, the texts they
compress and the two generate loops they compare, so that no test module imports another or conftest."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from kvzip_cli import LoadedModel

DOCS = Path(__file__).resolve().parent.parent / "examples" / "docs"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer() -> PreTrainedTokenizerFast:
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


TEXT = DOCS.joinpath("apache-2.0.txt").read_text()[:2500]
QUESTIONS = ["What is licensed?", "Who grants the patent license?"]
FAMILY_TEXT = DOCS.joinpath("apache-2.0.txt").read_text()[:1000]  # ≈ 450 tokens: many sliding windows long


def uncached(lm: LoadedModel, ids: torch.Tensor, new_tokens: int):
    """(greedy tokens, their logits) of the model run on `ids` with no cache."""
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, min_new_tokens=new_tokens, output_logits=True,
                                return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.logits)


def cached(lm: LoadedModel, kv, ids: torch.Tensor, new_tokens: int):
    """(greedy tokens, their logits) of the model continuing a loaded cache `kv` with `ids`; the cache is reset."""
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=kv.cache,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    kv.reset()
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.logits)
