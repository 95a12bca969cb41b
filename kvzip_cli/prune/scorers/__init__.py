"""Query-agnostic scorers: each rates every cached (layer, KV head, position) without knowing the question.

The registry names each scorer's module and class, imported on first use: the names (the command line's choices)
cost no torch import.
"""

import importlib

from ...errors import UsageError

SCORERS: dict[str, str] = {  # name → "module:Class" in this package
    "kvzip": "kvzip:KVzipScorer",
    "kvzip-plus": "kvzip_plus:KVzipPlusScorer",
    "compactor": "compactor:CompactorScorer",
    "knorm": "knorm:KnormScorer",
    "streaming": "streaming:StreamingScorer",
    "random": "random_baseline:RandomScorer",
}
DEFAULT_SCORER = "kvzip"


def check_scorer(name: str) -> None:
    if name not in SCORERS:
        raise UsageError(f"unknown scorer {name!r}: use one of {', '.join(SCORERS)}")


def scorer_class(name: str) -> type:
    check_scorer(name)
    module, cls = SCORERS[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def get_scorer(name: str):
    """A fresh scorer (base.Scorer) of the given name."""
    return scorer_class(name)()


def __getattr__(name: str):
    if name in ("Scorer", "ScoringInputs"):  # the shared types, in base (which imports torch)
        return getattr(importlib.import_module(".base", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_SCORER", "SCORERS", "Scorer", "ScoringInputs", "check_scorer", "get_scorer", "scorer_class"]
