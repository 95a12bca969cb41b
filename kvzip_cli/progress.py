"""Progress bars on stderr (rich), or nothing when disabled (library use, --json runs, tests)."""

import contextlib
from collections.abc import Callable, Iterator

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
TaskFactory = Callable[[str, int], Advance]


def silent_task(description: str, total: int) -> Advance:
    return lambda n=1: None


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[TaskFactory]:
    """Yields `task(description, total) -> advance(n)`."""
    if not enabled:
        yield silent_task
        return
    bars = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )

    def task(description: str, total: int) -> Advance:
        task_id = bars.add_task(description, total=total)
        return lambda n=1: bars.advance(task_id, n)

    with bars:
        yield task
