"""The tokenizer kvc rebuilds from a GGUF's vocabulary (kvzip_cli.models.gguf_tokenizer), on small vocabularies
written here: llama.cpp's SentencePiece rules (merges by score, user-defined tokens split off first, bytes for what is
not a token, the space prefix after every special token), its token types by text, and the GGUFs it refuses. Parity with
llama.cpp itself, on both real models: tests/test_real_tokenizer.py."""

import dataclasses
import json

import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer

from kvzip_cli import KvcError
from kvzip_cli.models.gguf_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    USER_DEFINED,
    UnreproducibleTokenizer,
    read_vocab,
    tokenizer_json,
)

BYTES = [f"<0x{b:02X}>" for b in range(256)]
# id: 0 <unk>, 1 <s>, 2 </s>, 3-258 bytes, then the pieces; "ab" outranks "bc", so "abc" is (ab)c, never a(bc)
PIECES = [("▁", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0), ("ab", -5.0), ("bc", -6.0), ("abc", -7.0),
          ("▁a", -8.0), ("ca", -9.0), ("cab", -0.5)]


def write_gguf(path, tokens, types, scores=None, model="llama", pre=None, merges=None, name="tiny", **flags):
    writer = GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in flags.items():
        writer.add_bool(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def spm(tmp_path, extra=(), extra_types=(), **flags):
    tokens = ["<unk>", "<s>", "</s>", *BYTES, *(p for p, _ in PIECES), *extra]
    types = [CONTROL, CONTROL, CONTROL, *[BYTE] * 256, *[NORMAL] * len(PIECES), *extra_types]
    scores = [0.0] * 259 + [s for _, s in PIECES] + [-100.0] * len(extra)
    return write_gguf(tmp_path / "spm.gguf", tokens, types, scores, **flags)


def build(path) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(tokenizer_json(read_vocab(path))))


def pieces(tokenizer: Tokenizer, text: str, special: bool = False) -> list[str]:
    tokenizer.encode_special_tokens = not special
    return tokenizer.encode(text, add_special_tokens=False).tokens


def test_sentencepiece_merges_the_best_scoring_pair_first(tmp_path):
    tok = build(spm(tmp_path, add_space_prefix=False, add_bos_token=True))
    assert pieces(tok, "abc") == ["abc"]  # a+b (-5) before b+c (-6), then ab+c
    assert pieces(tok, "cabc") == ["cab", "c"]  # a+b (-5) first, then c+ab (-0.5) before ab+c (-7)
    assert pieces(tok, "bca") == ["bc", "a"]
    assert pieces(tok, "a bc") == ["a", "▁", "bc"]  # spaces are ▁, merged only where a token has them
    assert pieces(tok, "é") == ["<0xC3>", "<0xA9>"]  # a character that is no token: its UTF-8 bytes
    assert tok.encode("abc").tokens == ["<s>", "abc"]  # BOS as the GGUF's add_bos_token says


def test_user_defined_tokens_are_split_off_first_and_control_ones_only_when_parsed(tmp_path):
    tok = build(spm(tmp_path, extra=["\n", "  ", "<ctl>"], extra_types=[USER_DEFINED, USER_DEFINED, CONTROL],
                    add_space_prefix=False))
    assert pieces(tok, "ab\nc  a") == ["ab", "\n", "c", "  ", "a"]
    assert pieces(tok, "a<ctl>b") == ["a", "<0x3C>", "c", "<0x74>", "<0x6C>", "<0x3E>", "b"]
    assert pieces(tok, "a<ctl>b", special=True) == ["a", "<ctl>", "b"]


def test_the_space_prefix_goes_before_the_text_and_after_every_special_token(tmp_path):
    """llama.cpp prepends a space to a piece of text at the start and after any token split off (is_prev_special)."""
    tok = build(spm(tmp_path, extra=["\n"], extra_types=[USER_DEFINED], add_space_prefix=True))
    assert pieces(tok, "a\na") == ["▁a", "\n", "▁a"]


def test_llama_cpp_makes_end_of_generation_texts_control(tmp_path):
    """"</s>" typed user-defined (as in Gemma 3's GGUF) is control to llama.cpp: split off only when parsing
    specials; "<|im_end|>" typed normal, too."""
    tok = build(spm(tmp_path, extra=["</x>", "<|im_end|>"], extra_types=[USER_DEFINED, NORMAL],
                    add_space_prefix=False))
    spec = tokenizer_json(read_vocab(tmp_path / "spm.gguf"))
    special = {t["content"]: t["special"] for t in spec["added_tokens"]}
    assert special["</x>"] is False and special["<|im_end|>"] is True and special["</s>"] is True
    assert pieces(tok, "a<|im_end|>", special=True) == ["a", "<|im_end|>"]


@pytest.mark.parametrize("change,why", [
    ({"model": "bert"}, "tokenizer model 'bert'"),
    ({"model": "gpt2", "pre": "qwen2", "merges": ["a b"]}, "pre-tokenizer 'qwen2'"),
    ({"remove_extra_whitespaces": True}, "remove_extra_whitespaces"),
    ({"name": "Phi-3 mini"}, "strips spaces"),
    ({"duplicate": True}, "duplicate or empty"),
    ({"ambiguous": True}, "hash order"),
])
def test_a_tokenizer_kvc_cannot_reproduce_is_refused(tmp_path, change, why):
    tokens = ["<unk>", "<s>", "</s>", *BYTES, *(p for p, _ in PIECES)]
    types = [CONTROL, CONTROL, CONTROL, *[BYTE] * 256, *[NORMAL] * len(PIECES)]
    scores = [0.0] * len(tokens)
    if change.pop("duplicate", False):
        tokens[-1] = tokens[-2]
    if change.pop("ambiguous", False):  # two FIM prefix candidates, neither control
        tokens += ["<PRE>", "<fim_prefix>"]
        types += [USER_DEFINED, USER_DEFINED]
        scores += [0.0, 0.0]
    flags = {k: change.pop(k) for k in list(change) if k == "remove_extra_whitespaces"}
    path = write_gguf(tmp_path / "m.gguf", tokens, types, scores, **change, **flags)
    with pytest.raises(UnreproducibleTokenizer, match=why):
        tokenizer_json(read_vocab(path), "m.gguf")


def test_a_gguf_whose_tokenizer_cannot_be_reproduced_is_not_converted(tmp_path, monkeypatch):
    """Refused with one line before anything is converted, and no model folder is left behind."""
    from kvzip_cli.models.loading import resolve

    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", ["<unk>", "<s>", "</s>", "x"], [CONTROL] * 3 + [NORMAL], model="bert")
    with pytest.raises(KvcError, match="kvc cannot tokenize as llama.cpp does for this GGUF") as caught:
        resolve(str(path))
    assert "\n" not in str(caught.value)
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_the_tokenizer_files_load_in_transformers(tmp_path):
    """The folder's tokenizer_config.json names the generic fast tokenizer (which keeps tokenizer.json as built) and
    the GGUF's special tokens and chat template."""
    from transformers import AutoTokenizer

    from kvzip_cli.models.loading import _write_tokenizer

    path = spm(tmp_path, add_space_prefix=False, add_bos_token=False)
    vocab = read_vocab(path)
    vocab = dataclasses.replace(vocab, chat_template="{{ messages[0]['content'] }}")
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_tokenizer(folder, vocab, tokenizer_json(vocab))
    loaded = AutoTokenizer.from_pretrained(folder)
    assert (loaded.bos_token, loaded.eos_token, loaded.unk_token) == ("<s>", "</s>", "<unk>")
    assert loaded.chat_template == "{{ messages[0]['content'] }}"
    assert loaded("abc").input_ids == [vocab.tokens.index("abc")]
    assert loaded.decode(loaded("ab bc").input_ids) == "ab bc"
