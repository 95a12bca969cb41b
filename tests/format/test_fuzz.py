"""Fuzz the `.kvc` reader for KVC_FUZZ_SECONDS seconds (default 120) with mutated golden files
(tests/format/fuzzing.py).

Every input must decode or raise a KvcFormatError subclass; the reader runs in a worker subprocess with a capped
address space and a per-input timeout. KVC_FUZZ_SEED sets the seed (default 1, so CI runs are repeatable; long
runs should try new seeds) and KVC_FUZZ_SAVE_DIR keeps the failing inputs somewhere known (default: tmp_path).

A long run, outside pytest (a random seed unless --seed is given):

    python tests/format/fuzzing.py --seconds 3600 --save-dir /tmp/fuzz-finds
    python tests/format/fuzzing.py --replay /tmp/fuzz-finds/<saved input>.kvc
"""

import os

import pytest

from fuzzing import fuzz

DEEP_ERRORS = ("CodecError", "MetadataError", "LayoutError", "LimitError")


@pytest.mark.fuzz
def test_reader_survives_mutated_files(tmp_path):
    seconds = float(os.environ.get("KVC_FUZZ_SECONDS", "120"))
    seed = int(os.environ.get("KVC_FUZZ_SEED", "1"))
    save_dir = os.environ.get("KVC_FUZZ_SAVE_DIR", str(tmp_path))
    report = fuzz(seconds, seed, save_dir)
    print(report.summary())

    assert not report.failed, f"{report.summary()}\n{report.describe_failures()}"
    least = min(1000, int(20 * seconds))
    assert report.inputs > least, f"only {report.inputs} inputs ran: {report.summary()}"
    # The structure-aware mutations get past the checksums: files decode, and the deep checks refuse the rest.
    assert report.outcomes["ok"] > report.inputs // 50, report.summary()
    missing = [e for e in DEEP_ERRORS if report.outcomes[e] < 10]
    assert not missing, f"no (or too few) {missing} raised: {report.summary()}"
    assert report.outcomes["ChecksumError"] < report.inputs // 2, report.summary()
