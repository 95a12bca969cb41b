"""Tiny random-weight models of every decoder family kvc supports, built in-process (no download), for the family
tests (tests/test_families.py). Each keeps the trait of its family that kvc's cache has to honour: Llama 3 scaled
RoPE, Qwen2 biases, Qwen3 and OLMo 2 q/k norms, Mistral and Gemma sliding windows, Gemma 2 logit soft-capping,
Gemma's head_dim larger than hidden / heads and query_pre_attn_scalar scaling, Gemma 3's RoPE per layer type,
Phi-3 fused qkv with partial rotary and a sliding window, GPT-NeoX partial rotary without GQA, Granite's attention,
residual and embedding multipliers.
"""

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kvzip_cli import LoadedModel
from kvzip_cli.context import layer_windows

from fixtures import tiny_fields

WINDOW = 24  # sliding window of the sliding families: far shorter than the test document
LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name → (model class, config class, config fields beyond the common ones)
FAMILIES = {
    "llama3": (LlamaForCausalLM, LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 16}),
    "mistral": (MistralForCausalLM, MistralConfig, {"head_dim": 16, "sliding_window": WINDOW}),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, {
        "hidden_size": 48, "head_dim": 64, "query_pre_attn_scalar": 32, "sliding_window": WINDOW,
        "layer_types": LAYERS, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0}),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, {
        "hidden_size": 48, "head_dim": 64, "query_pre_attn_scalar": 32, "sliding_window": WINDOW,
        "layer_types": LAYERS}),
    "phi3": (Phi3ForCausalLM, Phi3Config, {"partial_rotary_factor": 0.5, "sliding_window": WINDOW}),
    "gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig, {"num_key_value_heads": None, "rotary_pct": 0.25}),
    "olmo2": (Olmo2ForCausalLM, Olmo2Config, {}),
    "granite": (GraniteForCausalLM, GraniteConfig, {
        "attention_multiplier": 0.2, "residual_multiplier": 0.5, "embedding_multiplier": 3.0, "logits_scaling": 2.0}),
}
SLIDING = {"mistral", "gemma2", "gemma3", "phi3"}  # Phi-3 mini 4k has a window on every layer
PARTIAL_ROTARY = {"phi3", "gpt_neox"}
# Families whose keys kvc can store with RoPE removed: a file records one set of rotary frequencies for all layers,
# which per-layer-type RoPE (Gemma 3) does not fit.
PRE_ROPE = set(FAMILIES) - {"gemma3"}


def family_model(name: str, tokenizer, seed: int = 0, initializer_range: float = 0.2) -> LoadedModel:
    """A 3-layer model of family `name` (hidden 64 unless the family wants otherwise, 4 query heads over 2 KV heads
    where the family has GQA), in float32 with eager attention, so that its own no-cache forward is the exact
    reference (SDPA would drop Gemma 2's soft-capping). A larger initializer_range than transformers' default gives
    attention that is far from uniform, so a wrong mask or scale shows."""
    model_class, config_class, extra = FAMILIES[name]
    fields = {**tiny_fields(tokenizer, initializer_range), "bos_token_id": None}
    fields.update(extra)
    fields = {k: v for k, v in fields.items() if v is not None}
    torch.manual_seed(seed)
    config = config_class(**fields)
    config._attn_implementation = "eager"
    return LoadedModel(model_class(config).eval(), tokenizer, f"tiny-{name}")


def attention_modules(model) -> list[torch.nn.Module]:
    """The model's attention modules, in layer order."""
    found = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda m: m.layer_idx)


def masked_logits(model, ids: list[int], context: int, keep: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Reference for a pruned cache: logits of the tokens after the context in a full forward with eager attention
    and, per layer, a per-head 4D mask that hides from those tokens the context entries `keep` (layers, kv_heads,
    tokens) drops, on top of the causal mask and the layer's sliding window; `bias` (same shape) is added to those
    tokens' logits of the context entries."""
    n = len(ids)
    position = torch.arange(n)
    heads = model.config.num_attention_heads
    handles = []
    for module, window in zip(attention_modules(model), layer_windows(model.config), strict=True):
        allowed = position[None, :] <= position[:, None]
        if window is not None:
            allowed &= position[None, :] > position[:, None] - window
        allowed = allowed.expand(heads, n, n).clone()
        per_query_head = keep[module.layer_idx].repeat_interleave(heads // keep.shape[1], dim=0)
        allowed[:, context:, :context] &= per_query_head[:, None, :]
        mask = torch.where(allowed, 0.0, float("-inf"))
        if bias is not None:
            mask[:, context:, :context] += bias[module.layer_idx].repeat_interleave(heads // keep.shape[1], 0)[:, None]
        mask = mask[None]

        def hook(module, args, kwargs, mask=mask):
            kwargs["attention_mask"] = mask
            return args, kwargs

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0, context:]
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
