"""Which model families kvc supports: the tested decoder families, and the architectures refused at compress.

kvc needs a decoder-only causal LM whose every layer is softmax attention over a cache of per-token, per-KV-head
keys and values (full or sliding-window). Models whose cache is something else are refused with one line saying
why, before any costly work: encoder-decoders (the document would be the encoder's, read through cross-attention),
multi-head latent attention (the cache is a shared low-rank latent, not per-head keys and values), state-space,
recurrent and linear-attention layers (a fixed-size state summarising the whole prefix, with no entries to score
or prune), and Llama 4's chunked attention (its mask restarts every chunk, which kvc's cache does not model).
"""

from typing import TYPE_CHECKING

from ..errors import KvcError

if TYPE_CHECKING:  # transformers only where a model is checked: `kvc models` lists TESTED without torch
    from transformers import PreTrainedConfig, PreTrainedModel

# (family, the transformers class tests/test_families.py proves it with; what kvc's cache honours for it in comments)
TESTED = (
    ("Llama 3.x", "LlamaForCausalLM"),  # llama3-scaled RoPE
    ("Qwen2 / Qwen2.5", "Qwen2ForCausalLM"),  # q/k/v biases
    ("Qwen3", "Qwen3ForCausalLM"),  # q/k norms
    ("Mistral", "MistralForCausalLM"),  # a sliding window on every layer
    ("Gemma 2", "Gemma2ForCausalLM"),  # sliding-window layers, logit soft-capping, query_pre_attn_scalar
    ("Gemma 3 (text)", "Gemma3ForCausalLM"),  # sliding-window layers with their own RoPE, q/k norms
    ("Phi-3 / Phi-4-mini", "Phi3ForCausalLM"),  # fused qkv, partial rotary
    ("GPT-NeoX / Pythia", "GPTNeoXForCausalLM"),  # partial rotary, no GQA
    ("OLMo 2", "Olmo2ForCausalLM"),  # q/k norms over all heads
    ("Granite 3", "GraniteForCausalLM"),  # attention, residual and embedding multipliers
)
TESTED_FAMILIES = tuple(f"{family} ({model_class})" for family, model_class in TESTED)

# Families whose layers are (partly) not softmax attention, by transformers model_type; layer_types and
# layers_block_type catch others.
STATE_SPACE = frozenset({
    "mamba", "mamba2", "falcon_mamba", "jamba", "falcon_h1", "bamba", "zamba", "zamba2", "granitemoehybrid",
    "nemotron_h", "recurrent_gemma", "rwkv", "xlstm", "lfm2", "lfm2_moe", "minimax", "qwen3_next", "qwen3_5",
    "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
})
ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention"})


def check_supported(model: "PreTrainedModel") -> None:
    """Raise KvcError, one line saying why, when kvc cannot cache `model`'s architecture."""
    check_config(model.config, type(model).__name__)


def check_config(config: "PreTrainedConfig", model_class: str | None = None) -> None:
    """`check_supported` from the config alone (e.g. `AutoConfig.from_pretrained`, before loading any weights);
    `model_class` names the model in the message when the config lists no architectures."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    text = config.get_text_config(decoder=True)
    name = f"{(config.architectures or [model_class or 'the model'])[0]} (model_type {text.model_type!r})"
    seq2seq = config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES  # BartForCausalLM is still BART
    if getattr(config, "is_encoder_decoder", False) or seq2seq:
        raise KvcError(f"{name} is an encoder-decoder model: kvc caches a document prefilled through a decoder-only "
                       "causal LM, not an encoder's output read through cross-attention")
    if getattr(text, "kv_lora_rank", None):
        raise KvcError(f"{name} uses multi-head latent attention (kv_lora_rank {text.kv_lora_rank}): its cache is a "
                       "shared low-rank latent, not the per-head keys and values kvc scores, prunes and quantizes")
    kinds = set(getattr(text, "layer_types", None) or ()) | set(getattr(text, "layers_block_type", None) or ())
    others = sorted(kinds - ATTENTION_LAYERS - {"attention", "chunked_attention"})
    if others or text.model_type in STATE_SPACE or not getattr(text, "num_attention_heads", None):
        found = f" ({', '.join(others)} layers)" if others else ""
        raise KvcError(f"{name} has state-space, recurrent or linear-attention layers{found}: their fixed-size state "
                       "summarises the whole prefix, with no per-token keys and values to prune; kvc needs every "
                       "layer to be softmax attention")
    if "chunked_attention" in kinds or getattr(text, "attention_chunk_size", None):
        raise KvcError(f"{name} uses chunked attention (as Llama 4), whose mask restarts every chunk: kvc's cache "
                       "supports full and sliding-window attention only")
