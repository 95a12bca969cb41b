"""Progress of a corpus run on stderr, one step per document: a rich bar with documents, tokens per second and the
time left on a terminal; one line per document when stderr is redirected; nothing when disabled (--json)."""

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .progress import duration

Update = Callable[[dict], None]


class _Rate:
    """Documents done and tokens compressed per second of this run (skipped documents count as done, not as
    tokens: they cost no prefill)."""

    def __init__(self, total: int):
        self.total, self.done, self.tokens = total, 0, 0
        self.started = time.monotonic()

    def add(self, row: dict) -> None:
        self.done += 1
        if row["status"] == "ok":
            self.tokens += row["tokens"] or 0

    def tokens_per_second(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"{self.tokens / elapsed:,.0f} tokens/s" if elapsed > 0 and self.tokens else "- tokens/s"

    def eta(self) -> str:
        if not self.done or self.done >= self.total:
            return ""
        left = (time.monotonic() - self.started) * (self.total - self.done) / self.done
        return f", eta {duration(left)}"


def _line(rate: _Rate, row: dict) -> str:
    what = row["error"] if row["status"] == "error" else (
        f"{row['tokens']:,} tokens" + (f" in {row['seconds']:.1f} s" if row["status"] == "ok" else ""))
    return (f"kvc compress: [{rate.done}/{rate.total}] {row['status']} {row['source']}: {what}; "
            f"{rate.tokens_per_second()}{rate.eta()}")


@contextlib.contextmanager
def corpus_progress(enabled: bool, total: int) -> Iterator[Update]:
    """Yields `update(row)`, to call as each document's manifest row comes in."""
    rate = _Rate(total)
    if not enabled:
        yield rate.add
        return
    console = Console(stderr=True)
    if not (console.is_terminal or console.is_jupyter):
        def write(row: dict) -> None:
            rate.add(row)
            print(_line(rate, row), file=sys.stderr, flush=True)

        yield write
        return
    bars = Progress(TextColumn("documents"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
    task = bars.add_task("documents", total=total, rate="- tokens/s")

    def advance(row: dict) -> None:
        rate.add(row)
        bars.update(task, advance=1, rate=rate.tokens_per_second())
        if row["status"] == "error":
            bars.console.print(f"failed {row['source']}: {row['error']}", highlight=False, markup=False)

    with bars:
        yield advance
