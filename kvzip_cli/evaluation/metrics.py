"""Fidelity of a compressed cache against the full cache (definitions in ARCHITECTURE.md, "Metrics").

All inputs are per probe: `ref` and `got` are log-probabilities (answer_tokens, vocab) of the next token along
the full cache's greedy answer (teacher-forced), `answer` that answer's token ids.
"""

from dataclasses import dataclass, field

import torch

from ..document import common_prefix

REPEAT_N = 4  # the n of the repeated-n-gram rate


@dataclass
class FidelityTotals:
    """Sums over answer positions (pooled across probes), per-probe agreement, and how the greedy answers end and
    repeat themselves."""

    kl: float = 0.0
    top1_hits: int = 0
    nll_delta: float = 0.0
    positions: int = 0
    agreements: list[float] = field(default_factory=list)
    ends: list[bool] = field(default_factory=list)  # per probe whose full-cache answer ends: does this one too
    repeats: list[int] = field(default_factory=lambda: [0, 0])  # repeated n-grams, n-grams: pooled over answers

    def add_positions(self, ref: torch.Tensor, got: torch.Tensor, answer: list[int]) -> None:
        ref, got = ref.double(), got.double()
        self.kl += float((ref.exp() * (ref - got)).sum())
        self.top1_hits += int((ref.argmax(-1) == got.argmax(-1)).sum())
        index = torch.tensor(answer, device=ref.device)[:, None]
        self.nll_delta += float((ref.gather(-1, index) - got.gather(-1, index)).sum())
        self.positions += len(answer)

    def add_agreement(self, reference: list[int], generated: list[int]) -> None:
        self.agreements.append(agreement(reference, generated))

    def add_answer(self, reference: list[int], generated: list[int], stop: set[int]) -> None:
        """A greedy answer beside the full cache's (each cut at the same limit, ending with a stop token if one
        came): agreement, whether it ends where the reference ends, its repeated n-grams."""
        self.add_agreement(reference, generated)
        if reference and reference[-1] in stop:
            self.ends.append(bool(generated) and generated[-1] in stop)
        repeated, total = repeated_ngrams(generated)
        self.repeats[0] += repeated
        self.repeats[1] += total

    def summary(self) -> dict:
        n = max(self.positions, 1)
        return {
            "kld": self.kl / n,
            "top1": self.top1_hits / n,
            "delta_nll": self.nll_delta / n,
            "agreement": sum(self.agreements) / max(len(self.agreements), 1),
            "ends": sum(self.ends) / len(self.ends) if self.ends else None,
            "repetition": self.repeats[0] / max(self.repeats[1], 1),
        }


def repeated_ngrams(tokens: list[int], n: int = REPEAT_N) -> tuple[int, int]:
    """(n-grams that already occurred earlier in `tokens`, n-grams in `tokens`)."""
    seen, repeated = set(), 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        repeated += gram in seen
        seen.add(gram)
    return repeated, max(len(tokens) - n + 1, 0)


def answer_habits(answers: list[list[int]], stop: set[int]) -> dict:
    """The full cache's own: fraction of answers ending with a stop token within the limit, repeated-n-gram rate."""
    counts = [repeated_ngrams(a) for a in answers]
    return {"ends_full": sum(bool(a) and a[-1] in stop for a in answers) / max(len(answers), 1),
            "repetition_full": sum(r for r, _ in counts) / max(sum(t for _, t in counts), 1)}


def agreement(reference: list[int], generated: list[int]) -> float:
    """Length of the common prefix of two greedy answers, over the reference answer's length."""
    return common_prefix(reference, generated) / max(len(reference), 1)


def needle_found(answer: str, key: str) -> bool:
    return key in answer.replace(",", "").replace(" ", "")
