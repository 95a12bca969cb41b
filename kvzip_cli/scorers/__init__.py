"""Query-agnostic scorers: each rates every cached (layer, KV head, position) without knowing the question."""

from ..errors import UsageError
from .base import Scorer, ScoringInputs
from .compactor import CompactorScorer
from .knorm import KnormScorer
from .kvzip import KVzipScorer
from .kvzip_plus import KVzipPlusScorer
from .random_baseline import RandomScorer
from .streaming import StreamingScorer

SCORERS: dict[str, type] = {
    "kvzip": KVzipScorer,
    "kvzip-plus": KVzipPlusScorer,
    "compactor": CompactorScorer,
    "knorm": KnormScorer,
    "streaming": StreamingScorer,
    "random": RandomScorer,
}
DEFAULT_SCORER = "kvzip"


def check_scorer(name: str) -> None:
    if name not in SCORERS:
        raise UsageError(f"unknown scorer {name!r}: use one of {', '.join(SCORERS)}")


def get_scorer(name: str) -> Scorer:
    check_scorer(name)
    return SCORERS[name]()


__all__ = ["DEFAULT_SCORER", "SCORERS", "Scorer", "ScoringInputs", "check_scorer", "get_scorer"]
