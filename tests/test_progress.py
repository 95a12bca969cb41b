"""Progress: plain lines when stderr is not a terminal (a log file), bars on a terminal, nothing when disabled."""

import io
import json
import time

import pytest
from typer.testing import CliRunner

from kvzip_cli import progress
from kvzip_cli.cli import app
from kvzip_cli.progress import LineProgress, duration, progress_bars

runner = CliRunner()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log():
    stream, clock = io.StringIO(), Clock()
    return LineProgress(stream, "kvc bench", interval=15, clock=clock), stream, clock


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_durations():
    assert [duration(s) for s in (0.04, 41.23, 185, 3725)] == ["0.0 s", "41.2 s", "3m05s", "1h02m"]


def test_steps_get_a_line_when_they_start_and_end(log):
    lines_, stream, clock = log
    advance = lines_.task("bench", 3, steps=["prefill", "kvc kvzip 0.3", "preset small"])
    assert lines(stream) == ["kvc bench: [1/3] prefill …"]
    clock.now += 2.5
    advance(1)
    clock.now += 41.2
    advance(1)
    clock.now += 1
    advance(1)
    lines_.finish()
    assert lines(stream) == [
        "kvc bench: [1/3] prefill …",
        "kvc bench: [1/3] prefill done, 2.5 s",
        "kvc bench: [2/3] kvc kvzip 0.3 …",
        "kvc bench: [2/3] kvc kvzip 0.3 done, 41.2 s",
        "kvc bench: [3/3] preset small …",
        "kvc bench: [3/3] preset small done, 1.0 s",
        "kvc bench: all 3 steps done in 44.7 s",
    ]


def test_a_long_task_writes_its_fraction_at_most_every_interval(log):
    lines_, stream, clock = log
    advance = lines_.task("prefill", 1000)
    for _ in range(10):
        clock.now += 4
        advance(50)  # 40 s in all: lines at 16 s and 32 s
    assert lines(stream) == ["kvc bench: prefill 200/1,000 (20%), 16.0 s, eta 1m04s",
                             "kvc bench: prefill 400/1,000 (40%), 32.0 s, eta 48.0 s"]
    clock.now += 30
    advance(500)
    assert len(lines(stream)) == 2  # the "done" line waits for the next line, or the end
    lines_.finish()
    assert lines(stream)[-1] == "kvc bench: prefill 1,000/1,000 done in 1m10s"


def test_a_quiet_step_still_gets_lines_and_sub_tasks_name_their_step(log):
    lines_, stream, clock = log
    advance = lines_.task("bench", 2, steps=["prefill", "kvc kvzip 0.3"])
    advance(1)
    score = lines_.task("score kvzip", 10)
    clock.now += 16
    score(10)
    clock.now += 16
    lines_.tick()  # the heartbeat thread's call: nothing advanced for 16 s
    lines_.tick()  # and not again until another interval has passed
    assert lines(stream)[-2:] == [
        "kvc bench: [2/2] score kvzip 10/10 done in 16.0 s",
        "kvc bench: [2/2] kvc kvzip 0.3 … 32.0 s so far; bench 1/2 (50%), 32.0 s, eta 32.0 s",
    ]


def test_a_failing_run_keeps_its_error_last(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    with pytest.raises(RuntimeError), progress.progress_lines(stream, "kvc load") as task:
        task("load", 3)(3)
        raise RuntimeError("checksum")
    assert stream.getvalue() == ""
    with progress.progress_lines(stream, "kvc load") as task:
        task("load", 3)(3)
    assert lines(stream) == ["kvc load: load 3/3 done in 0.0 s"]


def test_heartbeat_thread_writes_while_nothing_advances():
    stream = io.StringIO()
    with progress.progress_lines(stream, "kvc", interval=0.05) as task:
        task("bench", 2, steps=["a", "b"])
        time.sleep(0.3)
    assert lines(stream)[0] == "kvc: [1/2] a …"
    assert any("so far" in line for line in lines(stream)[1:])


@pytest.fixture
def no_forced_terminal(monkeypatch):
    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(variable, raising=False)


def test_progress_bars_picks_lines_for_a_redirected_stderr(monkeypatch, no_forced_terminal):
    stream = io.StringIO()  # not a terminal
    monkeypatch.setattr(progress.sys, "stderr", stream)
    with progress_bars(True, name="kvc compress") as task:
        task("prefill", 4)(4)
    assert stream.getvalue() == "kvc compress: prefill 4/4 done in 0.0 s\n"
    with progress_bars(False) as task:
        task("prefill", 4)(4)
    assert stream.getvalue().count("\n") == 1


def test_progress_bars_on_a_terminal_draws_bars(monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    with progress_bars(True) as task:
        task("prefill", 4, steps=None)(4)
        task("bench", 2, steps=["a", "b"])(2)
    assert "\x1b[" in stream.getvalue() and "kvc" not in stream.getvalue()  # rich's bars, no log lines


def test_compress_and_bench_log_lines_to_a_redirected_stderr(tmp_path, tiny_folder, short_doc, no_forced_terminal):
    """The CLI under CliRunner: stderr is a pipe, not a terminal. Progress comes as `kvc CMD: ...` lines on stderr,
    no control characters, and bench's --json stdout stays pure JSON."""
    done = runner.invoke(app, ["compress", str(short_doc), "-o", str(tmp_path / "d.kvc"), "--model", str(tiny_folder)])
    assert done.exit_code == 0, done.output
    assert done.stderr.splitlines() == [line for line in done.stderr.splitlines() if line.startswith("kvc compress: ")]
    assert any(line.startswith("kvc compress: prefill ") and line.endswith(" s") for line in done.stderr.splitlines())
    assert any(line.startswith("kvc compress: score kvzip ") for line in done.stderr.splitlines())
    assert "\x1b" not in done.stderr and "\r" not in done.stderr

    done = runner.invoke(app, ["bench", str(short_doc), "--model", str(tiny_folder), "--new-tokens", "2",
                               "--presets", "", "--scorers", "", "--json"])
    assert done.exit_code == 0, done.output
    json.loads(done.stdout)
    log = done.stderr.splitlines()
    steps = len(json.loads(done.stdout)["rows"]) + 2
    assert log[0] == f"kvc bench: [1/{steps}] prefill the document …"
    assert f"kvc bench: [3/{steps}] kvc 16-bit raw …" in log
    assert any(line.startswith(f"kvc bench: [3/{steps}] kvc 16-bit raw done, ") for line in log)
    assert log[-1].startswith(f"kvc bench: all {steps} steps done in ")
    assert "\x1b" not in done.stderr


def test_a_failing_run_erases_its_bars_on_a_terminal(monkeypatch):
    """A corrupt file found by `kvc load` after its bar was drawn: the bar is erased, so the error line stands alone."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    with pytest.raises(ValueError), progress_bars(True) as task:
        task("load", 4)(3)
        raise ValueError("corrupt")
    out = stream.getvalue()
    assert "load" in out and out.rindex("\x1b[2K") > out.rindex("load")  # erase-line after the last drawing

    kept = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", kept)
    with progress_bars(True) as task:
        task("load", 4)(4)
    assert "\x1b[2K" not in kept.getvalue()[kept.getvalue().rindex("load"):]  # a finished bar stays
