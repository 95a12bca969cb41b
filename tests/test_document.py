"""Reading documents: UTF-8 text only; empty, binary and undecodable input refused with one clear message."""

import io
import sys

import pytest

from kvzip_cli import KvcError
from kvzip_cli.document import question_ids, read_document


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "is empty"),
        (b"  \n\t \n", "is empty"),
        (b"\x7fELF\x02\x01\x01\x00\x00", "binary"),
        (b"caf\xe9 au lait", "not UTF-8"),
        (b"\xff\xfeh\x00i\x00", "binary"),
    ],
)
def test_bad_documents(tmp_path, data, message):
    path = tmp_path / "doc.txt"
    path.write_bytes(data)
    with pytest.raises(KvcError, match=message):
        read_document(str(path))


def test_missing_and_directory(tmp_path):
    with pytest.raises(KvcError, match="does not exist"):
        read_document(str(tmp_path / "nope.txt"))
    with pytest.raises(KvcError, match="directory"):
        read_document(str(tmp_path))


def test_utf8_with_bom_and_non_ascii(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes("\ufeffZürich — 東京".encode())
    assert read_document(str(path)) == "Zürich — 東京"


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    assert read_document("-") == "from stdin"


def test_empty_question_is_refused(tiny_tokenizer):
    with pytest.raises(KvcError, match="prompt is empty"):
        question_ids(tiny_tokenizer, "", "", "   ")
