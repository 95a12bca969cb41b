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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..devices import resolve_device, resolve_dtype
from ..errors import KvcError
from .families import check_config
from .files import EMBEDDED, HUB_ALIASES, PACKAGED, converted_location, is_converted, packaged_gguf
from .gguf_tokenizer import GgufVocab, read_vocab, tokenizer_config, tokenizer_json

HUB_HOST = "huggingface.co"

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


def _write_tokenizer(folder: Path, vocab: GgufVocab, spec: dict) -> None:
    """The tokenizer files of a converted folder, from the GGUF's own vocabulary (kvzip_cli.models.gguf_tokenizer), in
    place of transformers' conversion of it (which tokenizes Gemma 3 otherwise than llama.cpp)."""
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(vocab), indent=2, ensure_ascii=False)
                                                  + "\n", encoding="utf-8")
    if vocab.chat_template:
        (folder / "chat_template.jinja").write_text(vocab.chat_template, encoding="utf-8")


def _fix_config(folder: Path) -> None:
    """transformers' GGUF conversion keeps RoPE's base only in `rope_parameters`, where readers of transformers 4
    configs (MLX-LM, older transformers) do not look: copy it to `rope_theta` too."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def converted_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a Hugging Face model folder under `cache_dir()`, reused afterwards; its
    tokenizer is rebuilt from the GGUF's vocabulary to tokenize as llama.cpp does, and a GGUF whose tokenizer kvc
    cannot rebuild is refused before anything is converted (UnreproducibleTokenizer)."""
    folder = converted_location(gguf)
    if is_converted(folder):
        return folder
    vocab = read_vocab(gguf)
    spec = tokenizer_json(vocab, gguf.name)
    print(f"kvc: converting {gguf.name} to a model folder in {folder} (once per GGUF file, about 20 s)",
          file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            model.save_pretrained(tmp)
        _write_tokenizer(tmp, vocab, spec)
        _fix_config(tmp)
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
    if spec in PACKAGED:
        return str(converted_folder(packaged_gguf(spec))), {}
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
        f"unknown model {spec!r}: give an alias ({', '.join([*PACKAGED, *HUB_ALIASES])}), "
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
