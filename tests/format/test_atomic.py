"""Atomic writes: the file appears complete or not at all, on every path AtomicFile can take."""

import os

import pytest

from kvc_format import atomic
from kvc_format.atomic import AtomicFile

DATA = os.urandom(3 << 20)


def write(path, monkeypatch, unnamed=True, linkable=True) -> AtomicFile:
    if not unnamed:
        monkeypatch.setattr(atomic, "_unnamed_file", lambda directory: None)
    if not linkable:
        monkeypatch.setattr(atomic, "_link", lambda fd, name: False)
    out = AtomicFile(path)
    out.file.write(DATA)
    return out


@pytest.mark.parametrize(("unnamed", "linkable"), [(True, True), (True, False), (False, True)],
                         ids=["unnamed-linked", "unnamed-copied", "named-partial"])
def test_commit_publishes_exactly_the_bytes(tmp_path, monkeypatch, unnamed, linkable):
    path = tmp_path / "doc.kvc"
    path.write_bytes(b"old")
    out = write(path, monkeypatch, unnamed, linkable)
    visible = sorted(p.name for p in tmp_path.iterdir())
    assert visible == (["doc.kvc"] if out.unnamed else [f".doc.kvc.{os.getpid()}.partial", "doc.kvc"])
    assert path.read_bytes() == b"old"  # until the commit, readers see the old file
    out.commit()
    assert path.read_bytes() == DATA
    assert [p.name for p in tmp_path.iterdir()] == ["doc.kvc"]


@pytest.mark.parametrize("unnamed", [True, False])
def test_discard_leaves_nothing(tmp_path, monkeypatch, unnamed):
    out = write(tmp_path / "doc.kvc", monkeypatch, unnamed)
    out.discard()
    assert list(tmp_path.iterdir()) == []
