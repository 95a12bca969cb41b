"""Ask every probe against a cache and compare with the full cache's answers.

Every forward pass gives explicit positions (the context length + offset), so a pruned cache, whose stored length
is shorter than the context it stands for, sees its question at the positions the full cache would.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import Cache, PreTrainedModel

from ..document import PromptLayout, question_ids
from ..models.loading import LoadedModel
from .metrics import FidelityTotals, answer_habits, needle_found
from .probes import Probe

NEEDLE_TOKENS = 16


@dataclass
class CacheUnderTest:
    cache: Cache
    context_length: int  # tokens of context the cache stands for; the question starts at this position


@dataclass
class ProbeReference:
    probe: Probe
    question: list[int]
    answer: list[int]  # the full cache's greedy answer (ends with a stop token when one came)
    logprobs: torch.Tensor  # (len(answer), vocab): full-cache next-token log-probabilities along `answer`


@dataclass
class Reference:
    probes: list[ProbeReference]
    needle_hits: list[bool]


@contextlib.contextmanager
def _restored(cache: Cache) -> Iterator[None]:
    """Drop whatever the block appends to `cache`, layer by layer (kvpress leaves layers of different lengths)."""
    lengths = [layer.get_seq_length() for layer in cache.layers]
    try:
        yield
    finally:
        for layer, n in zip(cache.layers, lengths, strict=True):
            layer.crop(n)


def _forward(model: PreTrainedModel, cut: CacheUnderTest, ids: list[int], start: int, all_logits: bool):
    device = model.device
    out = model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.arange(start, start + len(ids), device=device)[None],
        past_key_values=cut.cache,
        use_cache=True,
        logits_to_keep=0 if all_logits else 1,
    )
    return out.logits[0]


class Evaluator:
    """Runs the same probes, the same way, against the full cache and against every compressed one."""

    def __init__(self, lm: LoadedModel, layout: PromptLayout, probes: list[Probe], needles: list[Probe],
                 new_tokens: int = 32):
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.probes = probes
        self.needles = needles
        self.new_tokens = new_tokens
        self.questions = {
            p: question_ids(lm.tokenizer, layout.question_prefix, layout.question_suffix, p.question)
            for p in probes + needles
        }
        stop = lm.model.generation_config.eos_token_id
        stop = stop if isinstance(stop, list) else [stop]
        self.stop = {t for t in [*stop, lm.tokenizer.eos_token_id] if t is not None}

    def greedy(self, cut: CacheUnderTest, question: list[int], max_tokens: int) -> list[int]:
        with _restored(cut.cache):
            position = cut.context_length
            token = int(_forward(self.model, cut, question, position, False)[-1].argmax())
            answer, position = [token], position + len(question)
            while len(answer) < max_tokens and token not in self.stop:
                token = int(_forward(self.model, cut, [token], position, False)[-1].argmax())
                answer.append(token)
                position += 1
            return answer

    def answer_logprobs(self, cut: CacheUnderTest, question: list[int], answer: list[int]) -> torch.Tensor:
        with _restored(cut.cache):
            logits = _forward(self.model, cut, question + answer[:-1], cut.context_length, True)
            return torch.log_softmax(logits[len(question) - 1 :].float(), dim=-1)

    def _needle_hits(self, cut: CacheUnderTest) -> list[bool]:
        hits = []
        for probe in self.needles:
            answer = self.greedy(cut, self.questions[probe], NEEDLE_TOKENS)
            hits.append(needle_found(self.tokenizer.decode(answer, skip_special_tokens=True), probe.expect))
        return hits

    @torch.inference_mode()
    def reference(self, full: CacheUnderTest) -> Reference:
        probes = []
        for probe in self.probes:
            question = self.questions[probe]
            answer = self.greedy(full, question, self.new_tokens)
            probes.append(ProbeReference(probe, question, answer, self.answer_logprobs(full, question, answer)))
        return Reference(probes, self._needle_hits(full))

    @torch.inference_mode()
    def evaluate(self, cut: CacheUnderTest, reference: Reference) -> dict:
        totals = FidelityTotals()
        for ref in reference.probes:
            totals.add_positions(ref.logprobs, self.answer_logprobs(cut, ref.question, ref.answer), ref.answer)
            totals.add_answer(ref.answer, self.greedy(cut, ref.question, self.new_tokens), self.stop)
        hits = self._needle_hits(cut)
        return {**totals.summary(), "needle": sum(hits) / max(len(hits), 1)}

    def habits(self, reference: Reference) -> dict:
        """How the full cache's own answers end and repeat (`metrics.answer_habits`)."""
        return answer_habits([r.answer for r in reference.probes], self.stop)

    def answer_text(self, ref: ProbeReference) -> str:
        return self.tokenizer.decode(ref.answer, skip_special_tokens=True)
