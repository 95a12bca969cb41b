"""Progress on stderr: rich bars on a terminal, plain lines when stderr is redirected (a log file, a pipe), or
nothing when disabled (library use, --json runs of compress and load).

Code that reports progress asks the factory for a task, `advance = task(description, total)`, and calls
`advance(n)` as work gets done. A task made of named steps (a bench run: one step per setting) passes
`steps=[...]`, one label per unit of `total`: on a terminal it is one bar as any other; in a log each step gets a
line when it starts and one when it ends, with its time.

In a log a task that is not made of steps writes no line when it starts (a short one writes only its "done" line),
a line with its fraction done at most every LINE_INTERVAL seconds while it runs, and its "done" line once the next
line is written or the work ends. A failing run drops that last "done" line, so an error stays the last line.
"""

import contextlib
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]
LINE_INTERVAL = 15.0  # seconds between a log's lines while one long task runs


class TaskFactory(Protocol):
    def __call__(self, description: str, total: int, steps: Sequence[str] | None = None) -> Advance: ...


def silent_task(description: str, total: int, steps: Sequence[str] | None = None) -> Advance:
    return lambda n=1: None


def duration(seconds: float) -> str:
    """41.2 s, 3m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _LineTask:
    def __init__(self, description: str, total: int, steps: Sequence[str] | None, now: float):
        self.description, self.total = description, total
        self.steps = list(steps) if steps else None
        self.done = 0
        self.started = self.step_started = now

    def step_line(self, index: int) -> str:
        return f"[{index + 1}/{self.total}] {self.steps[index]}"

    def fraction(self, now: float) -> str:
        total = max(self.total, 1)
        done = min(self.done, total)
        elapsed = now - self.started
        eta = f", eta {duration(elapsed * (total - done) / done)}" if done else ""
        return f"{done:,}/{total:,} ({done / total:.0%}), {duration(elapsed)}{eta}"


class LineProgress:
    """The log form of the bars: one line per event, written to `stream` as `NAME: text`."""

    def __init__(self, stream: TextIO, name: str = "kvc", interval: float = LINE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.name, self.interval, self.clock = stream, name, interval, clock
        self._lock = threading.RLock()
        self._active: list[_LineTask] = []  # unfinished tasks, oldest first
        self._pending: list[str] = []  # "done" lines, written before the next line or at a clean end
        self._last_line = clock()

    def task(self, description: str, total: int, steps: Sequence[str] | None = None) -> Advance:
        if steps is not None and len(steps) != total:
            raise ValueError(f"{len(steps)} step labels for a task of {total} steps")
        with self._lock:
            now = self.clock()
            task = _LineTask(description, total, steps, now)
            if total > 0:
                prefix = self._prefix()
                self._active.append(task)
                if task.steps:
                    self._write(task.step_line(0) + " …")
            else:
                prefix = ""
        return lambda n=1: self._advance(task, n, prefix)

    def _prefix(self) -> str:
        """The current step of the innermost task made of steps, as `[3/12] `: a sub-task's lines say where they are."""
        for outer in reversed(self._active):
            if outer.steps and outer.done < outer.total:
                return f"[{outer.done + 1}/{outer.total}] "
        return ""

    def _advance(self, task: _LineTask, n: int, prefix: str) -> None:
        with self._lock:
            if task not in self._active or n <= 0:
                return
            now = self.clock()
            before, task.done = task.done, task.done + n
            if task.steps:
                for index in range(before, min(task.done, task.total)):
                    self._pending.append(f"{task.step_line(index)} done, {duration(now - task.step_started)}")
                    task.step_started = now
            if task.done >= task.total:
                self._active.remove(task)
                what = f"all {task.total} steps" if task.steps else (
                    f"{task.description} {task.total:,}/{task.total:,}")
                self._pending.append(f"{prefix}{what} done in {duration(now - task.started)}")
                return
            if task.steps:
                self._write(task.step_line(task.done) + " …")
            else:
                self.tick()

    def tick(self) -> None:
        """A line about the innermost running task, when none was written for `interval` seconds."""
        with self._lock:
            now = self.clock()
            if not self._active or now - self._last_line < self.interval:
                return
            task = self._active[-1]
            if task.steps:
                self._write(f"{task.step_line(task.done)} … {duration(now - task.step_started)} so far; "
                            f"{task.description} {task.fraction(now)}")
            else:
                self._write(f"{self._prefix()}{task.description} {task.fraction(now)}")

    def write(self, text: str) -> None:
        """A line of the caller's own (a corpus run's line per document), after the "done" lines still pending, so
        that a document's line follows its phases'."""
        with self._lock:
            self._write(text)

    def finish(self) -> None:
        """The work ended well: write the lines still pending."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        lines, self._pending = self._pending, []
        for line in lines:
            self._emit(line)

    def _write(self, text: str) -> None:
        self._flush()
        self._emit(text)

    def _emit(self, text: str) -> None:
        self._last_line = self.clock()
        try:
            self.stream.write(f"{self.name}: {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: progress is not worth failing the work for
            pass


def command_name() -> str:
    """`kvc bench` while a kvc command runs, else `kvc`."""
    # Typer 0.29 runs commands on its own copy of click; older ones on click itself.
    for module in ("typer._click.globals", "click"):
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None and ctx.parent is not None:
            while ctx.parent.parent is not None:  # `kvc bench lengths`: named by its command, bench
                ctx = ctx.parent
            return f"kvc {ctx.info_name}"
    return "kvc"


@contextlib.contextmanager
def line_progress(stream: TextIO, name: str, interval: float = LINE_INTERVAL) -> Iterator[LineProgress]:
    """Yields a LineProgress, with a thread that writes its periodic lines between advances."""
    lines = LineProgress(stream, name, interval)
    stop = threading.Event()

    def beat():
        while not stop.wait(min(1.0, interval)):
            lines.tick()

    beater = threading.Thread(target=beat, name="kvc-progress", daemon=True)
    beater.start()
    try:
        yield lines
    finally:
        stop.set()
        beater.join()
    lines.finish()  # not reached when the work raised: its error is the last line


@contextlib.contextmanager
def progress_lines(stream: TextIO, name: str, interval: float = LINE_INTERVAL) -> Iterator[TaskFactory]:
    """Yields the task factory of a line_progress."""
    with line_progress(stream, name, interval) as lines:
        yield lines.task


@contextlib.contextmanager
def progress_bars(enabled: bool, name: str | None = None) -> Iterator[TaskFactory]:
    """Yields `task(description, total, steps=None) -> advance(n)`: bars when stderr is a terminal, lines when not."""
    if not enabled:
        yield silent_task
        return
    console = Console(stderr=True)
    if not (console.is_terminal or console.is_jupyter):
        with progress_lines(sys.stderr, name or command_name()) as task:
            yield task
        return
    bars = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )

    def task(description: str, total: int, steps: Sequence[str] | None = None) -> Advance:
        task_id = bars.add_task(description, total=total)
        return lambda n=1: bars.advance(task_id, n)

    with bars:
        try:
            yield task
        except BaseException:
            bars.live.transient = True  # a failed run's bars are erased: its one-line error is all that stays
            raise
