"""A query-agnostic self-check of a compressed cache: probes built from the document alone, answered from the
compressed cache and from the full cache.

Two kinds of probe, each quoting the first words of a line at evenly spaced depths of the document:
- reconstruction: "Repeat the text that follows: «…»", scored along the document's own continuation;
- question: "What does the document say about «…»?", scored along the full cache's greedy answer, as a user's
  question would be.
Fidelity is the bench's: kld and top1 of the compressed cache's next-token distributions against the full cache's
along each answer (teacher-forced; kvzip_cli.evaluation.metrics), pooled over the probes.
"""

import re
from dataclasses import dataclass

import torch

from ..compress.prefilled import Prefilled
from ..document import question_ids
from .evaluator import CacheUnderTest, Evaluator
from .metrics import FidelityTotals

RECONSTRUCTION_PROBES = 8  # answers come from the document itself: more of them cost no generation
QUESTION_PROBES = 4
SNIPPET_WORDS = 8
QUESTION_WORDS = 6
ANSWER_TOKENS = 32


@dataclass(frozen=True)
class Probe:
    kind: str  # "reconstruction" or "question"
    question: list[int]  # the probe in the model's chat template
    answer: list[int]  # what it is scored along


def quotes(text: str, count: int, offset: float, words: int) -> list[tuple[str, str]]:
    """(the first `words` words of a line, the text after them) at depths (i + offset) / count; repeats dropped."""
    quotes, seen = [], set()
    for i in range(count):
        at = int(len(text) * (i + offset) / count)
        newline = text.find("\n", at)
        start = newline + 1 if newline >= 0 else at
        found = list(re.finditer(r"\S+", text[start:]))
        if len(found) <= words or start in seen:
            continue
        seen.add(start)
        quotes.append((" ".join(w.group() for w in found[:words]), text[start + found[words - 1].end() :]))
    return quotes


def build_probes(pre: Prefilled, evaluator: Evaluator, reconstruction: int, questions: int) -> list[Probe]:
    tokenizer, layout = pre.lm.tokenizer, pre.layout

    def ids(question: str) -> list[int]:
        return question_ids(tokenizer, layout.question_prefix, layout.question_suffix, question)

    probes = []
    for quote, follows in quotes(pre.text, reconstruction, 0.5, SNIPPET_WORDS):
        answer = tokenizer(follows, add_special_tokens=False).input_ids[:ANSWER_TOKENS]
        if len(answer) >= 2:
            probes.append(Probe("reconstruction", ids(f"Repeat the text that follows: «{quote}»"), answer))
    full = CacheUnderTest(pre.cache, pre.tokens)
    for quote, _ in quotes(pre.text, questions, 0.25, QUESTION_WORDS):
        question = ids(f"What does the document say about «{quote}»? Answer in one or two sentences.")
        answer = evaluator.greedy(full, question, ANSWER_TOKENS)
        if len(answer) >= 2:
            probes.append(Probe("question", question, answer))
    return probes


@dataclass(frozen=True)
class SelfCheckResult:
    top1: float
    kld: float
    probes: int
    positions: int

    def as_json(self) -> dict:
        return {"top1": self.top1, "kld": self.kld, "probes": self.probes, "positions": self.positions}


class SelfCheck:
    """The probes of one prefilled document and the full cache's answers to them, computed once; `run` scores any
    cache of the same document against them."""

    @torch.inference_mode()
    def __init__(self, pre: Prefilled, reconstruction: int = RECONSTRUCTION_PROBES, questions: int = QUESTION_PROBES):
        self.tokens = pre.tokens
        self._evaluator = Evaluator(pre.lm, pre.layout, [], [])
        self.probes = build_probes(pre, self._evaluator, reconstruction, questions)
        full = CacheUnderTest(pre.cache, pre.tokens)
        self._reference = [self._evaluator.answer_logprobs(full, p.question, p.answer) for p in self.probes]

    @torch.inference_mode()
    def run(self, cache) -> SelfCheckResult:
        """Score `cache` (standing for the same document; a PrunedCache needs kvc's attention function active)."""
        totals = FidelityTotals()
        cut = CacheUnderTest(cache, self.tokens)
        for probe, reference in zip(self.probes, self._reference, strict=True):
            totals.add_positions(reference, self._evaluator.answer_logprobs(cut, probe.question, probe.answer),
                                 probe.answer)
        summary = totals.summary()
        return SelfCheckResult(summary["top1"], summary["kld"], len(self.probes), totals.positions)
