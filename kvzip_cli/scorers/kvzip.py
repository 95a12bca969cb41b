"""KVzip (Kim et al., 2025): score each cached entry by how much the model needs it to repeat the context.

After the prefill, the model is asked to repeat the document, one chunk per pass: a repeat instruction, then the
chunk's own tokens teacher-forced, attending to the full cached context as usual. An entry of the chunk scores the
largest attention weight it receives from any query of its pass, maximised over the query heads of its GQA group,
with the softmax taken over the template prefix, the chunk and the pass's own tokens: each chunk is normalised on
its own, so chunks far from the question are not starved by the rest of the document. The passes' own KV is
dropped after each pass.
"""

from dataclasses import dataclass

import torch

from ..attention import kvc_attention_in, observe_attention
from .base import ScoringInputs

FIRST_PROMPT = "Repeat the previous context exactly."
NEXT_PROMPT = "Repeat the part of the previous context exactly, starting with "
PROMPT_ROOM = 64  # positions left for a pass's instruction


def max_received(query: torch.Tensor, key: torch.Tensor, scaling: float, block: int = 16,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The largest softmax weight each key receives from any query, maximised over the GQA group.

    query (1, heads, q, head_dim) are the last q of the k positions in key (1, kv_heads, k, head_dim), causal among
    themselves. Returns (kv_heads, k), float32. The products and the softmax run in `dtype` (bfloat16: the precision
    KVzip's reference runs in, and 3-4× faster than float32 on CPU), a few queries at a time so each block's
    weights stay in the CPU cache.
    """
    _, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    grouped = query[0].view(kv_heads, group, q_len, dim).to(dtype)
    keys_t = key[0].transpose(-1, -2).to(dtype).contiguous()
    best = torch.zeros(kv_heads, k_len, device=query.device)
    own = torch.arange(k_len - q_len, k_len, device=query.device)[None, :]
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        logits = torch.bmm(grouped[:, :, start:stop].reshape(kv_heads, -1, dim), keys_t).mul_(scaling)
        rows = torch.arange(start, stop, device=query.device)[:, None] + (k_len - q_len)
        logits.view(kv_heads, group, stop - start, k_len)[..., k_len - q_len :].masked_fill_(own > rows, float("-inf"))
        torch.maximum(best, torch.softmax(logits, dim=-1).amax(dim=1).float(), out=best)
    return best


@dataclass
class KVzipScorer:
    chunk_tokens: int = 2048  # document tokens reconstructed per pass (KVzip's default)
    lead_tokens: int = 8  # tokens of the previous chunk quoted in the next pass's instruction
    forward_tokens: int = 512  # a pass runs through the model this many tokens at a time, like the prefill
    name: str = "kvzip"
    default_allocation: str = "global"

    def _chunk_size(self, inputs: ScoringInputs) -> int:
        """Smaller chunks near the model's position limit, so a pass never runs past the positions it was trained
        on (the pass sits after the whole context)."""
        limit = getattr(inputs.model.config.get_text_config(), "max_position_embeddings", None)
        if not limit:
            return self.chunk_tokens
        return max(PROMPT_ROOM, min(self.chunk_tokens, limit - inputs.tokens - PROMPT_ROOM))

    def _passes(self, inputs: ScoringInputs) -> list[tuple[int, int, list[int]]]:
        """(first, end, ids) per pass: it reconstructs prefix_ids[first:end]."""
        layout, tok = inputs.layout, inputs.tokenizer
        start, end = layout.document_start, layout.document_end
        size = self._chunk_size(inputs)
        passes = []
        for first in range(start, end, size):
            last = min(first + size, end)
            if first == start:
                instruction = FIRST_PROMPT
            else:
                lead = tok.decode(layout.prefix_ids[max(start, first - self.lead_tokens) : first])
                instruction = NEXT_PROMPT + f'"{lead}"'
            prompt = tok(layout.question_prefix + instruction + layout.question_suffix, add_special_tokens=False)
            passes.append((first, last, prompt.input_ids + layout.prefix_ids[first:last]))
        return passes

    @torch.inference_mode()
    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        model, cache, n = inputs.model, inputs.cache, inputs.tokens
        prefix = inputs.layout.document_start
        layers, kv_heads = len(cache.layers), cache.layers[0].keys.shape[1]
        scores = torch.zeros(layers, kv_heads, n, device=model.device)
        chunk = [0, 0]

        def observer(layer: int, query, key, value, scaling):
            first, last = chunk
            seen = torch.cat([key[:, :, :prefix], key[:, :, first:last], key[:, :, n:]], dim=2)
            best = max_received(query, seen, scaling)[:, prefix : prefix + last - first]
            scores[layer, :, first:last] = torch.maximum(scores[layer, :, first:last], best)  # over a pass's pieces
            return None  # the pass itself attends to everything, through SDPA

        passes = self._passes(inputs)
        advance = inputs.task("score kvzip", sum(len(ids) for _, _, ids in passes))
        with kvc_attention_in(model), observe_attention(observer):
            for first, last, ids in passes:
                chunk[:] = first, last
                try:
                    for a in range(0, len(ids), self.forward_tokens):
                        piece = ids[a : a + self.forward_tokens]
                        model(input_ids=torch.tensor([piece], device=model.device),
                              position_ids=torch.arange(n + a, n + a + len(piece), device=model.device)[None],
                              past_key_values=cache, use_cache=True, logits_to_keep=1)
                        advance(len(piece))
                finally:
                    cache.crop(n)  # the context's cache, as the prefill left it, even after an interrupt
        return scores.cpu()
