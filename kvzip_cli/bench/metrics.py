"""Fidelity of a compressed cache against the full cache (definitions in ARCHITECTURE.md, "Metrics").

All inputs are per probe: `ref` and `got` are log-probabilities (answer_tokens, vocab) of the next token along
the full cache's greedy answer (teacher-forced), `answer` that answer's token ids.
"""

from dataclasses import dataclass, field

import torch

from ..document import common_prefix


@dataclass
class FidelityTotals:
    """Sums over answer positions (pooled across probes) and per-probe agreement."""

    kl: float = 0.0
    top1_hits: int = 0
    nll_delta: float = 0.0
    positions: int = 0
    agreements: list[float] = field(default_factory=list)

    def add_positions(self, ref: torch.Tensor, got: torch.Tensor, answer: list[int]) -> None:
        ref, got = ref.double(), got.double()
        self.kl += float((ref.exp() * (ref - got)).sum())
        self.top1_hits += int((ref.argmax(-1) == got.argmax(-1)).sum())
        index = torch.tensor(answer, device=ref.device)[:, None]
        self.nll_delta += float((ref.gather(-1, index) - got.gather(-1, index)).sum())
        self.positions += len(answer)

    def add_agreement(self, reference: list[int], generated: list[int]) -> None:
        self.agreements.append(agreement(reference, generated))

    def summary(self) -> dict:
        n = max(self.positions, 1)
        return {
            "kld": self.kl / n,
            "top1": self.top1_hits / n,
            "delta_nll": self.nll_delta / n,
            "agreement": sum(self.agreements) / max(len(self.agreements), 1),
        }


def agreement(reference: list[int], generated: list[int]) -> float:
    """Length of the common prefix of two greedy answers, over the reference answer's length."""
    return common_prefix(reference, generated) / max(len(reference), 1)


def needle_found(answer: str, key: str) -> bool:
    return key in answer.replace(",", "").replace(" ", "")
