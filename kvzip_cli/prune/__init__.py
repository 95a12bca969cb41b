"""Pruning a prefilled cache without knowing the question: scorers rate every entry (`scorers`), a budget keeps the
best of them per layer and head (`budget`), and the kept values are refit to stand for the dropped ones (`refit`);
`scoring.score_context` runs the three.

This module is torch-free: the command line checks the allocation names before it imports torch.
"""

from ..errors import UsageError

ALLOCATIONS = ("global", "layer", "head", "position")


def check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation {allocation!r}: use one of {', '.join(ALLOCATIONS)}")


def default_logit_bias(allocation: str | None) -> bool:
    """Whether the refit stores a logit bias unless told: not for a position allocation, which is for llama.cpp,
    whose cache has no place for one."""
    return allocation != "position"
