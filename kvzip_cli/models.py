"""Resolve `--model` (alias, hub id, local folder, .gguf file) to a loaded transformers causal LM."""

import contextlib
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .devices import resolve_device, resolve_dtype
from .errors import KvcError
from .families import check_config
from .model_files import EMBEDDED, HUB_ALIASES, converted_location, embedded_gguf, is_converted

HUB_HOST = "huggingface.co"

# tokenizer_config.json key → the GGUF metadata it comes from (a token id, or a flag)
GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
GGUF_TOKENIZER_FLAGS = {
    "add_bos_token": "tokenizer.ggml.add_bos_token",
    "add_eos_token": "tokenizer.ggml.add_eos_token",
    "add_prefix_space": "tokenizer.ggml.add_space_prefix",
}


@contextlib.contextmanager
def _quiet_transformers():
    """Keep transformers' own progress bars and advice off the user's terminal."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and the name kvc records for it (`--model` as given)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def _gguf_tokenizer_metadata(gguf: Path) -> tuple[int, dict[str, tuple[str, int]], dict[str, bool]]:
    """The GGUF's vocabulary size, the special tokens it names (tokenizer_config.json key → (token, id)) and the
    tokenizer flags it declares (tokenizer_config.json key → value)."""
    fields = GGUFReader(gguf).fields

    def scalar(name: str):
        field = fields[name]
        return field.parts[field.data[0]][0].item()

    tokens = fields["tokenizer.ggml.tokens"]
    count = len(tokens.data)
    special = {key: (bytes(tokens.parts[tokens.data[scalar(name)]]).decode(), scalar(name))
               for key, name in GGUF_SPECIAL_TOKENS.items() if name in fields and 0 <= scalar(name) < count}
    flags = {key: bool(scalar(name)) for key, name in GGUF_TOKENIZER_FLAGS.items() if name in fields}
    return count, special, flags


def _post_processor(special: dict[str, tuple[str, int]], flags: dict[str, bool]) -> dict:
    """A tokenizers TemplateProcessing that adds BOS and EOS as the GGUF's add_bos_token and add_eos_token say (what
    transformers' own `update_post_processor` builds)."""
    bos = special.get("bos_token") if flags.get("add_bos_token") else None
    eos = special.get("eos_token") if flags.get("add_eos_token") else None

    def sequence(name: str, type_id: int) -> list[dict]:
        items = [{"Sequence": {"id": name, "type_id": type_id}}]
        if bos:
            items.insert(0, {"SpecialToken": {"id": bos[0], "type_id": type_id}})
        if eos:
            items.append({"SpecialToken": {"id": eos[0], "type_id": type_id}})
        return items

    return {"type": "TemplateProcessing", "single": sequence("A", 0), "pair": sequence("A", 0) + sequence("B", 1),
            "special_tokens": {t[0]: {"id": t[0], "ids": [t[1]], "tokens": [t[0]]} for t in (bos, eos) if t}}


def _clean_folder(folder: Path, gguf: Path) -> None:
    """Rewrite what transformers' GGUF conversion gets wrong for other readers (MLX-LM, older transformers), from the
    GGUF's own metadata: its tokenizer_config.json names whatever tokenizer class the architecture maps to (for a
    LLaMA-architecture GGUF, CodeLlamaTokenizer, whose infill tokens it adds beyond the model's vocabulary), takes
    EOS to be the BOS token and asks for a prefix space; its tokenizer.json adds BOS even when the GGUF says not to;
    its config.json holds RoPE's base only in `rope_parameters`, where readers of transformers 4 configs do not look.

    tokenizer.json keeps its vocabulary, merges, normalizer and pre-tokenizer (what transformers built from the GGUF;
    they decide the token ids), so the class named is the generic PreTrainedTokenizerFast, which uses them as they
    are: a specific class may rebuild its own pre-tokenizer (transformers 5.24's GPT2Tokenizer does)."""
    count, special, flags = _gguf_tokenizer_metadata(gguf)
    tokenizer_file = folder / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < count]
    if "add_bos_token" in flags or "add_eos_token" in flags:
        tokenizer["post_processor"] = _post_processor(special, flags)
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                **{key: token for key, (token, _) in special.items()}, **flags}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def converted_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a Hugging Face model folder under `cache_dir()`, reused afterwards."""
    folder = converted_location(gguf)
    if is_converted(folder):
        return folder
    print(f"kvc: converting {gguf.name} to a model folder in {folder} (once per GGUF file, about 20 s)",
          file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _clean_folder(tmp, gguf)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process converted it first
            if not is_converted(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _hub_reachable() -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=3):
            return True
    except OSError:
        return False


def _hub_kwargs(repo: str, name: str) -> dict:
    """Load from the local HF cache when the model is there; fail fast with one line when the hub is unreachable."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return {"local_files_only": True}
    if os.environ.get("HF_HUB_OFFLINE") or not _hub_reachable():
        raise KvcError(
            f"model {name!r} ({repo}) is not in the local Hugging Face cache and the hub is unreachable; "
            f"use --model {EMBEDDED} (embedded, offline), a local model folder or a .gguf file"
        )
    return {}


def resolve(spec: str) -> tuple[str, dict]:
    """Map `--model` to a from_pretrained location and its extra keyword arguments."""
    if spec == EMBEDDED:
        return str(converted_folder(embedded_gguf())), {}
    if spec in HUB_ALIASES:
        return HUB_ALIASES[spec], _hub_kwargs(HUB_ALIASES[spec], spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise KvcError(f"GGUF file {spec} does not exist")
        return str(converted_folder(path)), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KvcError(f"{spec} is a folder without config.json, not a transformers model folder")
        return str(path), {}
    if spec.count("/") == 1 and not path.exists() and not spec.startswith((".", "/")):
        return spec, _hub_kwargs(spec, spec)
    raise KvcError(
        f"unknown model {spec!r}: give an alias ({', '.join([EMBEDDED, *HUB_ALIASES])}), "
        "a hub id (org/name), a local model folder or a .gguf file"
    )


def load_model(spec: str = EMBEDDED, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load `spec` for inference on `device` in `dtype` (see `resolve_dtype` for `auto`)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    location, kwargs = resolve(spec)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(location, **kwargs)
            check_config(config)  # an architecture kvc cannot cache is refused before its weights load
            # SDPA has no soft-capping (Gemma 2): transformers' eager attention applies it, as kvc's does
            softcap = getattr(config.get_text_config(decoder=True), "attn_logit_softcapping", None)
            attention = {"attn_implementation": "eager"} if softcap else {}
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs, **attention)
    except OSError as exc:
        raise KvcError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        raise KvcError(f"model {spec!r} is not a causal LM transformers can load: {exc}") from None
    model.to(torch_device).eval()
    return LoadedModel(model, tokenizer, spec)
