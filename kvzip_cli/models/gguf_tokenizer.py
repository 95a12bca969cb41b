"""A GGUF's tokenizer rebuilt from its own vocabulary, scores, token types and flags, so that a converted model folder
tokenizes as llama.cpp does (transformers' own GGUF conversion does not: for Gemma 3 it gives other ids from the third
token on, and ~1.8× as many).

Two of llama.cpp's tokenizers are rebuilt, as a Hugging Face `tokenizers` file (tokenizer.json), which transformers,
MLX-LM and any other reader of model folders load:

- `tokenizer.ggml.model` = "llama" (SentencePiece-style, llama.cpp's SPM): the text is split first at every
  user-defined token (and at control tokens when specials are parsed), longest first; each remaining piece has its
  spaces written as U+2581 (with one prepended where `add_space_prefix` says), then the adjacent pair whose
  concatenation is the highest-scoring token is merged, again and again; what is left that is not a token becomes
  its UTF-8 bytes' <0xXX> tokens. As a `tokenizers` BPE: a merge for every split of every token into two tokens,
  ranked by the merged token's score (llama.cpp breaks ties by position: for distinct tokens of equal score, or two
  splits of one token competing for one symbol, the rank order here decides instead).
- `tokenizer.ggml.model` = "gpt2" (byte-level BPE) with a pre-tokenizer whose regular expressions are rebuilt here
  (`PRE_TOKENIZERS`), the GGUF's merges in their order, user-defined tokens split first as above.

Anything else (another tokenizer model, an unknown pre-tokenizer, whitespace folding, duplicate or empty tokens) is
refused with `UnreproducibleTokenizer`: a folder whose tokens differ from llama.cpp's would answer, but from another
text than the user gave (what kvc 0.6 did, silently, with Gemma 3). The parity is tested against node-llama-cpp's
`tokenize` on both real GGUF models (tests/test_real_tokenizer.py).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from ..errors import KvcError

# llama.cpp's token types (GGUF tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # how SentencePiece vocabularies write a space

# llama.cpp does not take every token's type from the GGUF: at load it marks tokens control by their text, which
# changes how a text is split (llama-vocab.cpp, "auto-detect special tokens by text"; the release node-llama-cpp
# 3.21.1 bundles). Every token with one of these texts ends a generation and becomes control:
END_OF_GENERATION = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
}
# and, for each fill-in-the-middle role the GGUF names no id for, the first token of these texts it meets (in hash
# order, which kvc cannot know: a vocabulary with two candidates that are not control already is refused)
FIM_ROLES = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
FIM_KEYS = {"fim_pre": ("fim_pre", "prefix"), "fim_suf": ("fim_suf", "suffix"), "fim_mid": ("fim_mid", "middle"),
            "fim_pad": ("fim_pad",), "fim_rep": ("fim_rep",), "fim_sep": ("fim_sep",)}
ALWAYS_USER_DEFINED = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}  # llama.cpp's gpt-oss rule

# The byte-level BPE pre-tokenizers rebuilt here, by the GGUF's tokenizer.ggml.pre: llama.cpp's regular expressions
# (llama-vocab.cpp, llm_tokenizer_bpe) as `tokenizers` steps, each splitting the pieces the one before left.
GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
PRE_TOKENIZERS = {
    # every digit on its own, then GPT-2's expression (llama.cpp's custom splitter matches it, trailing \s+ included)
    "smollm": [{"type": "Digits", "individual_digits": True}],
    "gpt-2": [],
}


class UnreproducibleTokenizer(KvcError):
    """The GGUF's tokenizer is one kvc cannot rebuild exactly as llama.cpp runs it."""


@dataclass(frozen=True)
class GgufVocab:
    """What a GGUF says of its tokenizer."""

    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[str]
    types: np.ndarray  # (tokens,) int: NORMAL … BYTE
    scores: np.ndarray | None  # (tokens,) float32, SentencePiece vocabularies
    merges: list[str] | None  # "left right", byte-level BPE vocabularies
    special: dict[str, int]  # "bos", "eos", "unk", "pad" → token id, where the GGUF names one
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    chat_template: str | None
    fim_named: frozenset[str] = frozenset()  # the FIM_ROLES whose token id the GGUF names
    name: str = ""  # general.name
    architecture: str = ""  # general.architecture


def _scalar(fields, name: str, default=None):
    field = fields.get(name)
    if field is None:
        return default
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value[0].item()


def _strings(fields, name: str) -> list[str] | None:
    field = fields.get(name)
    if field is None:
        return None
    return [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]


def _numbers(fields, name: str) -> np.ndarray | None:
    field = fields.get(name)
    if field is None:
        return None
    # an array field's parts hold each element at the indices `data` lists; the elements are contiguous in the file
    return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0)


def read_vocab(gguf: Path) -> GgufVocab:
    """The tokenizer metadata of a GGUF file (its tensors are not read)."""
    fields = GGUFReader(gguf).fields
    model = _scalar(fields, "tokenizer.ggml.model")
    tokens = _strings(fields, "tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise UnreproducibleTokenizer(f"{gguf.name} has no tokenizer (tokenizer.ggml.model and .tokens)")
    types = _numbers(fields, "tokenizer.ggml.token_type")
    types = np.full(len(tokens), NORMAL) if types is None else types.astype(np.int64)
    special = {}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        value = _scalar(fields, f"tokenizer.ggml.{name}_token_id")
        if value is not None and 0 <= value < len(tokens):
            special[key] = int(value)
    spm = model == "llama"  # llama.cpp's defaults differ by tokenizer model when the GGUF does not say
    return GgufVocab(
        model=model,
        pre=_scalar(fields, "tokenizer.ggml.pre"),
        tokens=tokens,
        types=types,
        scores=_numbers(fields, "tokenizer.ggml.scores"),
        merges=_strings(fields, "tokenizer.ggml.merges"),
        special=special,
        add_bos=bool(_scalar(fields, "tokenizer.ggml.add_bos_token", spm)),
        add_eos=bool(_scalar(fields, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_scalar(fields, "tokenizer.ggml.add_space_prefix", spm)),
        remove_extra_whitespaces=bool(_scalar(fields, "tokenizer.ggml.remove_extra_whitespaces", False)),
        chat_template=_scalar(fields, "tokenizer.chat_template"),
        fim_named=frozenset(role for role, keys in FIM_KEYS.items()
                            if any(f"tokenizer.ggml.{key}_token_id" in fields for key in keys)),
        name=_scalar(fields, "general.name", ""),
        architecture=_scalar(fields, "general.architecture", ""),
    )


def _refuse(name: str, why: str):
    raise UnreproducibleTokenizer(f"{name}: kvc cannot tokenize as llama.cpp does for this GGUF ({why}); its token "
                                  "ids would differ, so it is not converted")


def _check(vocab: GgufVocab, name: str) -> None:
    if vocab.model not in ("llama", "gpt2"):
        _refuse(name, f"tokenizer model {vocab.model!r}; kvc rebuilds 'llama' (SentencePiece) and 'gpt2' (BPE)")
    if vocab.model == "gpt2" and vocab.pre not in PRE_TOKENIZERS:
        _refuse(name, f"pre-tokenizer {vocab.pre!r}; kvc rebuilds {', '.join(sorted(PRE_TOKENIZERS))}")
    if vocab.model == "gpt2" and not vocab.merges:
        _refuse(name, "a BPE vocabulary without merges")
    if vocab.model == "llama" and (vocab.scores is None or len(vocab.scores) < len(vocab.tokens)):
        _refuse(name, "a SentencePiece vocabulary without a score per token")
    if vocab.remove_extra_whitespaces:
        _refuse(name, "remove_extra_whitespaces")
    strips = ("phi-3" in vocab.name.lower() or "phi3" in vocab.name.lower() or "modern-bert" in vocab.name.lower()
              or any(p in (vocab.pre or "") for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code"))
              or vocab.architecture in ("nomic-bert-moe", "jina-bert-v3"))
    if strips:
        _refuse(name, "llama.cpp strips spaces around this model's special tokens")
    if len(set(vocab.tokens)) != len(vocab.tokens) or "" in vocab.tokens:
        _refuse(name, "duplicate or empty token texts")


def _check_characters(vocab: GgufVocab, always: set[int], name: str) -> None:
    """SentencePiece: refuse a vocabulary where llama.cpp and the rebuilt tokenizer part. llama.cpp starts from
    characters and merges any two symbols whose text is a token, so a character that is no token can still join a
    neighbour; here such a character becomes bytes at once. The two agree unless a token that merging can form (not
    one split off the raw text first, `always`) is such a character next to a token or another character."""
    ids = set(vocab.tokens)
    if not all(f"<0x{b:02X}>" in ids for b in range(256)):
        _refuse(name, "a SentencePiece vocabulary without all 256 byte tokens")

    def joins(bare: str, rest: str) -> bool:
        return bare not in ids and (rest in ids or len(rest) == 1)

    if any(len(t) > 1 and i not in always and (joins(t[0], t[1:]) or joins(t[-1], t[:-1]))
           for i, t in enumerate(vocab.tokens)):
        _refuse(name, "a token made of a character that is not itself a token and a neighbour")


def _attributes(vocab: GgufVocab, name: str) -> tuple[set[int], set[int]]:
    """(tokens llama.cpp matches in the raw text before anything else, those of them it matches only when parsing
    specials): its user-defined, control and unknown tokens, after its load-time rules by text (END_OF_GENERATION,
    FIM_ROLES, ALWAYS_USER_DEFINED, and the Gemma 4 rule that a "</s>" beside "<|tool_response>" stays normal)."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    control = {i for i, kind in enumerate(vocab.types) if kind in (CONTROL, UNKNOWN)}
    user = {i for i, kind in enumerate(vocab.types) if kind == USER_DEFINED}
    control |= {ids[t] for t in END_OF_GENERATION if t in ids}
    for role, texts in FIM_ROLES.items():
        if role in vocab.fim_named:
            continue
        found = [ids[t] for t in texts if t in ids]
        if len(found) > 1 and not all(i in control for i in found):
            _refuse(name, f"llama.cpp makes one of {[vocab.tokens[i] for i in found]} a control token, which one "
                          "depends on its hash order")
        control |= set(found)
    for text in ALWAYS_USER_DEFINED & ids.keys():
        control.discard(ids[text])
        user.add(ids[text])
    if "<|tool_response>" in ids and "</s>" in ids:
        control.discard(ids["</s>"])
        user.discard(ids["</s>"])
    return user | control, control


def _added_tokens(vocab: GgufVocab, matched: set[int], special: set[int]) -> list[dict]:
    """The tokens split off first (`_attributes`), as `tokenizers` added tokens: llama.cpp's control ones as special
    tokens (matched unless specials are left unparsed, `split_special_tokens`, as llama.cpp leaves them unless asked
    to parse them; transformers parses them by default, which is how kvc lays out chat templates)."""
    return [{"id": i, "content": vocab.tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": i in special} for i in sorted(matched)]


def _post_processor(vocab: GgufVocab) -> dict | None:
    """BOS and EOS added as the GGUF's add_bos_token and add_eos_token say."""
    bos = vocab.special.get("bos") if vocab.add_bos else None
    eos = vocab.special.get("eos") if vocab.add_eos else None
    if bos is None and eos is None:
        return None
    named = [(vocab.tokens[i], i) for i in (bos, eos) if i is not None]

    def sequence(name: str, type_id: int) -> list[dict]:
        items = [{"Sequence": {"id": name, "type_id": type_id}}]
        if bos is not None:
            items.insert(0, {"SpecialToken": {"id": vocab.tokens[bos], "type_id": type_id}})
        if eos is not None:
            items.append({"SpecialToken": {"id": vocab.tokens[eos], "type_id": type_id}})
        return items

    return {"type": "TemplateProcessing", "single": sequence("A", 0), "pair": sequence("A", 0) + sequence("B", 1),
            "special_tokens": {text: {"id": text, "ids": [i], "tokens": [text]} for text, i in named}}


def _spm_merges(vocab: GgufVocab, always: set[int]) -> list[list[str]]:
    """Every split of every token into two tokens, ranked by the merged token's score (highest first), then by the
    token's id and the split's position (llama.cpp's own tie-break, by position in the text, has no rank form)."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    found = []
    for i, text in enumerate(vocab.tokens):
        if i in always:  # split off the raw text first in every mode: never formed by merging
            continue
        for cut in range(1, len(text)):
            if text[:cut] in ids and text[cut:] in ids:
                found.append((-float(vocab.scores[i]), i, cut))
    found.sort()
    return [[vocab.tokens[i][:cut], vocab.tokens[i][cut:]] for _, i, cut in found]


def _spm(vocab: GgufVocab, always: set[int]) -> dict:
    steps = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    if vocab.add_space_prefix:
        steps.insert(0, {"type": "Prepend", "prepend": SPACE})
    decoder = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}]
    if vocab.add_space_prefix:
        decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = vocab.special.get("unk")
    return {
        "normalizer": {"type": "Sequence", "normalizers": steps},
        "pre_tokenizer": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": vocab.tokens[unk] if unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab.tokens)}, "merges": _spm_merges(vocab, always)},
        "decoder": {"type": "Sequence", "decoders": decoder},
    }


def _bpe(vocab: GgufVocab) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    steps = [*PRE_TOKENIZERS[vocab.pre], byte_level]
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab.tokens)},
                  "merges": [m.split(" ", 1) for m in vocab.merges]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    }


def tokenizer_json(vocab: GgufVocab, name: str = "this GGUF") -> dict:
    """The tokenizer.json (a `tokenizers` Tokenizer) that tokenizes as llama.cpp does with `vocab`;
    UnreproducibleTokenizer for a tokenizer kvc cannot rebuild exactly."""
    _check(vocab, name)
    matched, special = _attributes(vocab, name)
    always = matched - special
    if vocab.model == "llama":
        _check_characters(vocab, always, name)
    parts = _spm(vocab, always) if vocab.model == "llama" else _bpe(vocab)
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": _added_tokens(vocab, matched, special), **parts, "post_processor": _post_processor(vocab)}


def tokenizer_config(vocab: GgufVocab) -> dict:
    """tokenizer_config.json for the generic PreTrainedTokenizerFast, which uses tokenizer.json as it is (a specific
    class may rebuild its own pre-tokenizer)."""
    named = {f"{key}_token": vocab.tokens[i] for key, i in vocab.special.items()}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "add_bos_token": vocab.add_bos, "add_eos_token": vocab.add_eos, **named}
