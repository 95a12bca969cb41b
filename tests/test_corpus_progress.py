"""A corpus run's progress on stderr, driven by hand (no model): what a log gets, and what a terminal keeps."""

import re
import time

import pytest

from kvzip_cli.corpus.progress import corpus_progress


@pytest.fixture
def stderr(monkeypatch, capsys):
    """stderr redirected (pytest's capture is no terminal), whatever the environment says."""
    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(variable, raising=False)
    return capsys


def row(source: str, status: str = "ok", tokens: int = 1000) -> dict:
    return {"source": source, "status": status, "tokens": tokens, "seconds": 3.0, "error": None}


def lines(capsys) -> list[str]:
    """stderr's lines since the last read, times and rates (which depend on the clock) as T and N."""
    return normalized(capsys.readouterr().err)


def normalized(text: str) -> list[str]:
    text = re.sub(r"\b\d+\.\d s\b|\b\d+m\d\ds\b|\b\d+h\d\dm\b", "T", text)
    return re.sub(r"[\d,]+ tokens/s", "N tokens/s", text).splitlines()


def test_a_redirected_run_says_how_many_documents_before_any_is_done(stderr):
    with corpus_progress(True, 3):
        assert lines(stderr) == ["kvc compress: 3 documents to compress"]


def test_a_redirected_run_writes_each_phase_of_a_document_before_its_row(stderr):
    with corpus_progress(True, 2) as display:
        display.task("prefill", 100)(100)
        display.task("score kvzip", 8)(8)
        display(row("a.txt"))
        display.task("prefill", 10)(10)
        display(row("b.txt", tokens=10))
    assert lines(stderr) == [
        "kvc compress: 2 documents to compress",
        "kvc compress: [1/2] prefill 100/100 done in T",
        "kvc compress: [1/2] score kvzip 8/8 done in T",
        "kvc compress: [1/2] ok a.txt: 1,000 tokens in T; N tokens/s, eta T",
        "kvc compress: [2/2] prefill 10/10 done in T",
        "kvc compress: [2/2] ok b.txt: 10 tokens in T; N tokens/s",
    ]


def test_a_long_phase_gets_lines_while_it_runs(stderr):
    with corpus_progress(True, 1, interval=0.05) as display:
        advance = display.task("prefill", 100)
        advance(40)
        time.sleep(0.3)  # the heartbeat thread writes the fraction done while nothing advances
        assert "kvc compress: [1/1] prefill 40/100 (40%), T, eta T" in lines(stderr)
        advance(60)


def test_a_skipped_document_says_done_before_and_no_placeholder_rate(stderr):
    with corpus_progress(True, 3) as display:
        display(row("a.txt", status="skipped", tokens=1234))
        display(row("b.txt"))
        display(row("c.txt", status="skipped"))
    log = stderr.readouterr().err
    assert "- tokens/s" not in log
    skipped_first, _, skipped_later = normalized(log)[1:]
    assert skipped_first == "kvc compress: [1/3] skipped a.txt: 1,234 tokens, done before; eta T"
    assert skipped_later == "kvc compress: [3/3] skipped c.txt: 1,000 tokens, done before; N tokens/s"


def test_phases_write_no_lines_on_a_terminal_or_when_disabled(monkeypatch, stderr):
    with corpus_progress(False, 1) as display:
        display.task("prefill", 4)(4)
        display(row("a.txt"))
    assert stderr.readouterr().err == ""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    with corpus_progress(True, 1) as display:
        display.task("prefill", 4)(4)
        display(row("a.txt"))
    bar = stderr.readouterr().err
    assert "\x1b[" in bar and "kvc compress" not in bar  # rich's bar, as before: no phase lines through it
