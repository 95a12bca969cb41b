"""KVzip (Kim et al., 2025): score each cached entry by how much the model needs it to repeat the context.

After the prefill, the model is asked to repeat the document, one chunk per pass: a repeat instruction, then the
chunk's own tokens teacher-forced, attending to the full cached context as usual. An entry of the chunk scores the
largest attention weight it receives from any query of its pass, maximised over the query heads of its GQA group,
with the softmax taken over the template prefix, the chunk and the pass's own tokens: each chunk is normalised on
its own, so chunks far from the question are not starved by the rest of the document. The passes' own KV is
dropped after each pass.

A sliding-window layer (window W) is scored as its attention runs: a pass's query at position p sees only the
entries at positions > p − W, so of the context only the document's last W − 1 positions, the ones that layer's
own cache holds, are ever seen and scored; passes whose queries see none of the chunk there skip the layer.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...attention import kvc_attention_in, observe_attention
from .base import ScoringInputs

FIRST_PROMPT = "Repeat the previous context exactly."
NEXT_PROMPT = "Repeat the part of the previous context exactly, starting with "
PROMPT_ROOM = 64  # positions left for a pass's instruction


def max_received(query: torch.Tensor, key: torch.Tensor, scaling: float, block: int = 16,
                 dtype: torch.dtype = torch.bfloat16, column: torch.Tensor | None = None,
                 row: torch.Tensor | None = None, window: tuple[torch.Tensor, torch.Tensor, int] | None = None
                 ) -> torch.Tensor:
    """The largest softmax weight each key receives from any query, maximised over the GQA group.

    query (1, heads, q, head_dim) are the last q of the k positions in key (1, kv_heads, k, head_dim), causal among
    themselves. Returns (kv_heads, k), float32. The products and the softmax run in `dtype` (bfloat16: the precision
    KVzip's reference runs in, and 3-4× faster than float32 on CPU), a few queries at a time so each block's
    weights stay in the CPU cache. Before the maximum, each weight can be scaled by a factor of its key and query
    head, `column` (heads, k), and by one of its query, `row` (q,) (KVzip+). `window` = (key positions (k,), query
    positions (q,), W) for a sliding-window layer: a query at position p sees only keys at positions > p − W.
    """
    _, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    grouped = query[0].view(kv_heads, group, q_len, dim).to(dtype)
    keys_t = key[0].transpose(-1, -2).to(dtype).contiguous()
    columns = None if column is None else column.view(kv_heads, group, 1, k_len).to(dtype)
    best = torch.zeros(kv_heads, k_len, device=query.device)
    own = torch.arange(k_len - q_len, k_len, device=query.device)[None, :]
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        logits = torch.bmm(grouped[:, :, start:stop].reshape(kv_heads, -1, dim), keys_t).mul_(scaling)
        rows = torch.arange(start, stop, device=query.device)[:, None] + (k_len - q_len)
        logits.view(kv_heads, group, stop - start, k_len)[..., k_len - q_len :].masked_fill_(own > rows, float("-inf"))
        if window is not None:  # every query sees at least itself, so no row is masked whole
            keys_at, queries_at, width = window
            out = keys_at[None, :] <= queries_at[start:stop, None] - width
            logits.view(kv_heads, group, stop - start, k_len).masked_fill_(out, float("-inf"))
        weights = torch.softmax(logits, dim=-1).view(kv_heads, group, stop - start, k_len)
        if row is not None:
            weights = weights * row[start:stop].view(1, 1, -1, 1).to(dtype)
        if columns is not None:
            weights = weights * columns
        torch.maximum(best, weights.flatten(1, 2).amax(dim=1).float(), out=best)
    return best


@dataclass
class KVzipScorer:
    chunk_tokens: int = 2048  # document tokens reconstructed per pass (KVzip's default)
    lead_tokens: int = 8  # tokens of the previous chunk quoted in the next pass's instruction
    forward_tokens: int = 512  # a pass runs through the model this many tokens at a time, like the prefill
    name: str = "kvzip"
    default_allocation: str = "global"
    records_queries = True  # fills inputs.queries as it scores (kvzip_cli.prune.refit)
    _chunk = (0, 0)  # the document span the running pass reconstructs
    _at = 0  # the position of the running forward's first query

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

    def reconstruct(self, inputs: ScoringInputs, observer, label: str) -> None:
        """Run every reconstruction pass over the cached context with `observer` watching each attention layer
        (kvzip_cli.attention.Observer); the cache is cropped back to the context after each pass, even after an
        interrupt. `inputs.queries`, when given, records the passes' queries too (kvzip_cli.prune.refit)."""
        model, cache, n = inputs.model, inputs.cache, inputs.tokens
        passes = self._passes(inputs)
        total = sum(len(ids) for _, _, ids in passes)
        recorder = inputs.queries

        def watch(layer: int, query, key, value, scaling):
            if recorder is not None:
                recorder(layer, query, key, value, scaling)
            return observer(layer, query, key, value, scaling)

        advance = inputs.task(label, total)
        with torch.inference_mode(), kvc_attention_in(model), observe_attention(watch):
            for first, last, ids in passes:
                self._chunk = first, last
                try:
                    for a in range(0, len(ids), self.forward_tokens):
                        piece = ids[a : a + self.forward_tokens]
                        self._at = n + a
                        if recorder is not None:
                            recorder.at = n + a
                        model(input_ids=torch.tensor([piece], device=model.device),
                              position_ids=torch.arange(n + a, n + a + len(piece), device=model.device)[None],
                              past_key_values=cache, use_cache=True, logits_to_keep=1)
                        advance(len(piece))
                finally:
                    cache.crop(n)

    def reconstruction_positions(self, inputs: ScoringInputs) -> int:
        """How many query positions the reconstruction passes run."""
        return sum(len(ids) for _, _, ids in self._passes(inputs))

    @torch.inference_mode()
    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        cache, n = inputs.cache, inputs.tokens
        prefix = inputs.layout.document_start
        layers, kv_heads = len(cache.layers), cache.layers[0].keys.shape[1]
        scores = torch.zeros(layers, kv_heads, n, device=inputs.model.device)
        geometry = inputs.geometry

        def observer(layer: int, query, key, value, scaling):
            first, last = self._chunk
            window = geometry.windows[layer] if geometry.windows is not None else None
            if window is not None and max(last, prefix) - 1 <= self._at - window:
                return None  # in this layer the pass sees neither the chunk nor the template
            base = geometry.first_position(layer)  # the position of the layer's first key
            device = query.device
            at = torch.cat([torch.arange(prefix, device=device), torch.arange(first, last, device=device),
                            torch.arange(n, base + key.shape[2], device=device)])
            at = at[at >= base]  # the template, the chunk and the pass itself, where the layer holds them
            index = at - base

            def seen(t: torch.Tensor) -> torch.Tensor:
                return t.index_select(2, index)

            sliding = None
            if window is not None:
                sliding = at, torch.arange(self._at, self._at + query.shape[2], device=device), window
            best = self._received(layer, query, key, value, seen, scaling, sliding)
            chunk = (at >= first) & (at < last)
            held = at[chunk]
            scores[layer, :, held] = torch.maximum(scores[layer, :, held], best[:, chunk])  # over a pass's pieces
            return None  # the pass itself attends to everything, through SDPA

        self.reconstruct(inputs, observer, f"score {self.name}")
        return scores.cpu()

    def _received(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  seen: Callable[[torch.Tensor], torch.Tensor], scaling: float,
                  window: tuple[torch.Tensor, torch.Tensor, int] | None) -> torch.Tensor:
        """(kv_heads, k): what each key a pass's queries see (`seen` picks them along dim 2 of key, value) scores from
        them (max_received; `window` as there)."""
        return max_received(query, seen(key), scaling, window=window)
