"""Model identity recorded in every `.kvc`: geometry, a tokenizer digest and a sampled weight digest; beside them the
vocabulary digest (`vocab`) that a runtime's own model file (a GGUF for llama.cpp) is checked against at export.

The weight digest hashes up to `SAMPLES_PER_TENSOR` evenly spaced elements of every parameter, rounded to
bfloat16, so the same checkpoint gives the same digest whether it is loaded in float32 or bfloat16, on CPU or
GPU. A float16 load of a checkpoint that is not float16 rounds differently and is (conservatively) refused.
"""

import hashlib
import json
import weakref

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvc_format.gguf import vocab_digest

SAMPLES_PER_TENSOR = 1024
IDENTITY_KEYS = (
    "architecture",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "rope",
    "tokenizer_digest",
    "weight_digest",
)

_cache: "weakref.WeakKeyDictionary[PreTrainedModel, dict]" = weakref.WeakKeyDictionary()
_tokenizer_cache: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple]" = weakref.WeakKeyDictionary()


def geometry(model: PreTrainedModel) -> dict:
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {
        "rope_theta": getattr(cfg, "rope_theta", None),
        "rope_scaling": getattr(cfg, "rope_scaling", None),
    }
    return {
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "rope": json.loads(json.dumps(rope, sort_keys=True, default=str)),
    }


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(tokenizer.all_special_tokens),
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


@torch.inference_mode()
def weight_digest(model: PreTrainedModel) -> str:
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        flat = param.detach().reshape(-1)
        count = min(flat.numel(), SAMPLES_PER_TENSOR)
        index = torch.arange(count, device=flat.device) * flat.numel() // count
        sample = flat[index].to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{list(param.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict:
    """The token strings of ids 0..count-1 (count: the model's rows that the tokenizer names), as a digest."""
    count = min(vocab_size, len(tokenizer))
    return {"count": count, "sha256": vocab_digest(tokenizer.convert_ids_to_tokens(list(range(count))))}


def _cached_tokenizer_fields(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict:
    # Recomputed when tokens are added or the chat template is set (len(tokenizer) would also tell, but costs ~20 ms
    # per call on a 49k vocabulary, more than the rest of a small file's load).
    key = (len(tokenizer.added_tokens_decoder), tokenizer.chat_template, vocab_size)
    cached = _tokenizer_cache.get(tokenizer)
    if cached is None or cached[0] != key:
        fields = {"tokenizer_digest": tokenizer_digest(tokenizer), "vocab": vocabulary(tokenizer, vocab_size)}
        cached = _tokenizer_cache[tokenizer] = (key, fields)
    return cached[1]


def fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Identity of (model, tokenizer); computed once per model object and tokenizer object."""
    if model not in _cache:
        _cache[model] = {**geometry(model), "weight_digest": weight_digest(model)}
    return {**_cache[model], **_cached_tokenizer_fields(tokenizer, _cache[model]["vocab_size"])}


def differences(recorded: dict, actual: dict) -> list[str]:
    """Identity fields on which two fingerprints disagree."""
    return [key for key in IDENTITY_KEYS if recorded.get(key) != actual.get(key)]
