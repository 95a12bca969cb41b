"""kvc: turn a long document into a small, reusable, compressed KV cache.

>>> import kvzip_cli
>>> kvzip_cli.compress("doc.txt", "doc.kvc")                 # like `kvc compress doc.txt -o doc.kvc`
>>> lm = kvzip_cli.load_model("smollm2")
>>> kv = kvzip_cli.load("doc.kvc", lm.model, lm.tokenizer)
>>> out = lm.model.generate(kv.prompt_ids(lm.tokenizer, "Who may copy it?"), past_key_values=kv.cache)
"""

import importlib
import sys
import types

__version__ = "0.6.0"

from .errors import KvcError, UsageError

# The public names that need torch and transformers are imported on first use, so that the commands which need no
# model (`kvc verify`, `inspect`, `export`, `version`, `models`) start in a fraction of a second.
_LAZY = {
    "CompressResult": "compress.result",
    "Settings": "compress.settings",
    "compress": "compress.pipeline",
    "compress_text": "compress.pipeline",
    "Answer": "load.answer",
    "ask": "load.answer",
    "LoadedKV": "load.loader",
    "load": "load.loader",
    "FileReport": "report",
    "inspect": "report",
    "LoadedModel": "models.loading",
    "load_model": "models.loading",
}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # The submodules `compress` and `load` share their names with public functions: importing them (which sets
        # the package attribute) must not hide the functions.
        if isinstance(value, types.ModuleType) and name in _LAZY:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["KvcError", "UsageError", "__version__", *_LAZY]
