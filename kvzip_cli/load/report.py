"""What `kvc load` reports: the file loaded, how long it took against a prefill, and each question's answer."""

from dataclasses import dataclass, field

from ..report import estimate_text, mb


@dataclass
class LoadReport:
    """`as_json()` is what `kvc load --json` prints (its keys: docs/json.md)."""

    file: str
    model: str
    tokens: int
    kept_ratio: float
    cache_bytes: int
    load_seconds: float
    decoder: str
    rans_decoder: str | None  # "compiled" or "numpy" for an entropy-coded file decoded on the CPU
    prefill_seconds: float | None  # recorded when the file was made
    prefill_device: str | None
    prefill_here_seconds: float | None  # measured here with --measure-prefill
    model_load_seconds: float
    document: str | None = None
    estimate: dict | None = None
    answers: list[dict] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        return self.prefill_here_seconds / self.load_seconds if self.prefill_here_seconds is not None else None

    def add(self, question: str, answer) -> None:
        """Record a kvzip_cli.load.answer.Answer."""
        self.answers.append({"question": question, "answer": answer.text, "stopped": answer.stopped,
                             "answer_tokens": len(answer.token_ids), "generate_seconds": answer.seconds})

    def as_json(self) -> dict:
        first = self.answers[0] if self.answers else {}
        out = {k: getattr(self, k) for k in ("file", "model", "tokens", "kept_ratio", "cache_bytes", "load_seconds",
                                              "decoder", "rans_decoder", "prefill_seconds", "prefill_device",
                                              "prefill_here_seconds")}
        out.update(speedup=self.speedup, model_load_seconds=self.model_load_seconds, document=self.document,
                   estimate=self.estimate, answer=first.get("answer"), stopped=first.get("stopped"),
                   generate_seconds=first.get("generate_seconds"), answers=self.answers)
        if first:
            out["answer_tokens"] = first["answer_tokens"]
        return out

    def lines(self) -> list[str]:
        """What was loaded and how long it took, against which prefill (measured here, or recorded at compress),
        and what the file lost."""
        kept = f" ({self.kept_ratio:.0%} kept, {mb(self.cache_bytes)} in memory)"
        line = f"loaded {self.tokens:,} tokens of KV{kept} in {self.load_seconds:.2f} s"
        if self.prefill_here_seconds is not None:
            line += (f"; prefilling the document here took {self.prefill_here_seconds:.2f} s: the cache was ready "
                     f"{self.speedup:.0f}x sooner")
        elif self.prefill_seconds is not None:
            where = f" on {self.prefill_device}" if self.prefill_device else ""
            line += (f" (the prefill took {self.prefill_seconds:.2f} s{where} when the file was made, maybe on "
                     "another machine; --measure-prefill times it here)")
        out = [line]
        if self.estimate is not None and self.estimate.get("probes"):
            out.append(f"estimated loss: {estimate_text(self.estimate)}")
        if self.answers:
            seconds = sum(a["generate_seconds"] for a in self.answers)
            out.append(f"answered {len(self.answers)} question{'s' if len(self.answers) > 1 else ''} in "
                       f"{seconds:.2f} s")
        return out
