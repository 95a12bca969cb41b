"""Progress of a corpus run on stderr, one step per document: a rich bar with documents, tokens per second and the
time left on a terminal; plain lines when stderr is redirected (a log): one when the run starts, those of the
current document's phases as `kvc compress` writes them for one document (kvzip_cli.progress.LineProgress), and
one per document as it finishes; nothing when disabled (--json)."""

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..progress import LINE_INTERVAL, Advance, TaskFactory, duration, line_progress, silent_task

NAME = "kvc compress"  # the lines' prefix, as the single-document command's
Update = Callable[[dict], None]


@dataclass(frozen=True)
class Display:
    """What corpus_progress yields: call it with each document's manifest row as it comes in; `task` is the
    TaskFactory for the phases (prefill, score, write…) of the document compressed now, by this process."""

    update: Update
    task: TaskFactory = silent_task  # on a terminal the bar stays as it is; with --json nothing shows

    def __call__(self, row: dict) -> None:
        self.update(row)


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
        """The rate, or "" before any token was compressed (only skipped or failed documents so far)."""
        elapsed = time.monotonic() - self.started
        return f"{self.tokens / elapsed:,.0f} tokens/s" if elapsed > 0 and self.tokens else ""

    def eta(self) -> str:
        if not self.done or self.done >= self.total:
            return ""
        left = (time.monotonic() - self.started) * (self.total - self.done) / self.done
        return f"eta {duration(left)}"


def _line(rate: _Rate, row: dict) -> str:
    if row["status"] == "error":
        what = row["error"]
    elif row["status"] == "ok":
        what = f"{row['tokens']:,} tokens in {row['seconds']:.1f} s"
    else:
        what = f"{row['tokens']:,} tokens, done before"
    run = ", ".join(part for part in (rate.tokens_per_second(), rate.eta()) if part)
    return f"[{rate.done}/{rate.total}] {row['status']} {row['source']}: {what}" + (f"; {run}" if run else "")


@contextlib.contextmanager
def corpus_progress(enabled: bool, total: int, interval: float = LINE_INTERVAL) -> Iterator[Display]:
    """Yields the run's Display; in a log a long phase gets a line at most every `interval` seconds."""
    rate = _Rate(total)
    if not enabled:
        yield Display(rate.add)
        return
    console = Console(stderr=True)
    if not (console.is_terminal or console.is_jupyter):
        with line_progress(sys.stderr, NAME, interval) as lines:
            # at once: the first document's line may come minutes later (the model loads, a long prefill)
            lines.write(f"{total:,} {'document' if total == 1 else 'documents'} to compress")

            def task(description: str, total: int, steps: Sequence[str] | None = None) -> Advance:
                # `[2/5] prefill …`: which document a phase's lines are about
                return lines.task(f"[{rate.done + 1}/{rate.total}] {description}", total, steps)

            def write(row: dict) -> None:
                rate.add(row)
                lines.write(_line(rate, row))

            yield Display(write, task)
        return
    bars = Progress(TextColumn("documents"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
    task = bars.add_task("documents", total=total, rate="- tokens/s")

    def advance(row: dict) -> None:
        rate.add(row)
        bars.update(task, advance=1, rate=rate.tokens_per_second() or "- tokens/s")  # a bar's column keeps its place
        if row["status"] == "error":
            bars.console.print(f"failed {row['source']}: {row['error']}", highlight=False, markup=False)

    with bars:
        yield Display(advance)
