"""Questions asked after the document: built-in query-agnostic probes, user probes, and planted needles."""

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import KvcError

RECONSTRUCTION_DEPTHS = (0.1, 0.35, 0.6, 0.85)
NEEDLE_DEPTHS = (0.1, 0.5, 0.9)
NEEDLE_NAMES = ("blue", "red", "green", "yellow", "white")
SNIPPET_WORDS = 8
GENERAL_PROBES = (
    ("summary", "Summarize the document in three sentences."),
    ("topic", "What is the main topic of the document? Answer in one sentence."),
    ("summary", "List the most important points of the document."),
)


@dataclass(frozen=True)
class Probe:
    kind: str  # reconstruction | summary | topic | user | needle
    question: str
    expect: str | None = None  # for needles: the planted key the answer must contain


def _snippet(text: str, depth: float) -> str:
    """The first words of the line that starts at or after `depth` of the text."""
    start = text.find("\n", int(len(text) * depth))
    words = text[start + 1 if start >= 0 else 0 :].split()
    return " ".join(words[:SNIPPET_WORDS])


def builtin_probes(text: str) -> list[Probe]:
    probes = []
    for depth in RECONSTRUCTION_DEPTHS:
        snippet = _snippet(text, depth)
        if snippet:
            probes.append(Probe("reconstruction", f"Repeat the text that follows: «{snippet}»"))
    return probes + [Probe(kind, question) for kind, question in GENERAL_PROBES]


def read_probes(path: str | Path) -> list[Probe]:
    """User probes: one question per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise KvcError(f"probe file {path} does not exist") from None
    except UnicodeDecodeError:
        raise KvcError(f"probe file {path} is not UTF-8 text") from None
    probes = [Probe("user", line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not probes:
        raise KvcError(f"probe file {path} holds no questions")
    return probes


def plant_needles(text: str) -> tuple[str, list[Probe]]:
    """Insert one key sentence per depth in NEEDLE_DEPTHS at paragraph (or line) starts; keys depend on the text."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    breaks = [m.end() for m in re.finditer(r"\n\s*\n", text)] or [m.end() for m in re.finditer(r"\n", text)]
    probes, inserts = [], []
    for depth, name in zip(NEEDLE_DEPTHS, NEEDLE_NAMES, strict=False):
        target = int(len(text) * depth)
        at = min(breaks, key=lambda b: abs(b - target)) if breaks else target
        key = str(rng.randrange(10_000, 100_000))
        inserts.append((at, f"The secret code for the {name} folder is {key}.\n\n"))
        probes.append(Probe("needle", f"What is the secret code for the {name} folder? Reply with the number only.",
                            expect=key))
    for at, sentence in sorted(inserts, reverse=True):
        text = text[:at] + sentence + text[at:]
    return text, probes
