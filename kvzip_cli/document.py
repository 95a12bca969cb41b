"""Read a document and lay it out as a reusable prompt prefix, recording how a later question is appended."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KvcError

if TYPE_CHECKING:  # transformers is imported by the commands that load a model, not to read a document
    from transformers import PreTrainedTokenizerBase

QUESTION_MARK = "\ue000kvc-question\ue000"  # a private-use placeholder no real text contains
DOCUMENT_QUESTION_SEPARATOR = "\n\n"


def read_document(source: str) -> str:
    """Text of a UTF-8 file, or of stdin for `-`; refuses empty, binary and undecodable input."""
    name = "stdin" if source == "-" else source
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except FileNotFoundError:
        raise KvcError(f"document {name} does not exist") from None
    except IsADirectoryError:
        raise KvcError(f"document {name} is a directory, not a text file") from None
    except PermissionError:
        raise KvcError(f"document {name} is not readable (permission denied)") from None
    return decode_document(data, name)


def decode_document(data: bytes, name: str) -> str:
    if b"\0" in data:
        raise KvcError(f"document {name} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KvcError(f"document {name} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise KvcError(f"document {name} is empty")
    return text


@dataclass(frozen=True)
class PromptLayout:
    """prefix_ids is the cached part; a question q becomes tokens of question_prefix + q + question_suffix."""

    prefix_ids: list[int]
    question_prefix: str
    question_suffix: str
    template: str  # "chat" (the tokenizer's chat template) or "plain"
    document_start: int  # prefix_ids[document_start:document_end] are the document's tokens; the rest is template
    document_end: int


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _document_span(tokenizer, text: str, document: str, ids: list[int], special: bool) -> tuple[int, int]:
    """Token span of `document` inside `text` (tokenized as `ids`), found by tokenizing the text before it."""
    body = document.strip()
    at = text.find(body)
    if at < 0:  # the template rewrote the document: treat every token as document
        return 0, len(ids)
    start = common_prefix(tokenizer(text[:at], add_special_tokens=special).input_ids, ids)
    end = common_prefix(tokenizer(text[: at + len(body)], add_special_tokens=special).input_ids, ids)
    return start, max(start, end)


def layout_prompt(tokenizer: "PreTrainedTokenizerBase", document: str) -> PromptLayout:
    """Split the full prompt for (document, question) at the question, so the document part can be cached."""
    if tokenizer.chat_template:
        content = document + DOCUMENT_QUESTION_SEPARATOR + QUESTION_MARK
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if text.count(QUESTION_MARK) == 1:
            before, after = text.split(QUESTION_MARK)
            ids = tokenizer(before, add_special_tokens=False).input_ids
            return PromptLayout(ids, "", after, "chat", *_document_span(tokenizer, before, document, ids, False))
    text = document + DOCUMENT_QUESTION_SEPARATOR + "Question:"
    ids = tokenizer(text).input_ids
    return PromptLayout(ids, " ", "\nAnswer:", "plain", *_document_span(tokenizer, text, document, ids, True))


def question_ids(tokenizer: "PreTrainedTokenizerBase", question_prefix: str, question_suffix: str, question: str):
    if not question.strip():
        raise KvcError("the prompt is empty")
    return tokenizer(question_prefix + question + question_suffix, add_special_tokens=False).input_ids
