"""kvc: turn a long document into a small, reusable, compressed KV cache.

>>> import kvzip_cli
>>> kvzip_cli.compress("doc.txt", "doc.kvc")                 # like `kvc compress doc.txt -o doc.kvc`
>>> lm = kvzip_cli.load_model("smollm2")
>>> kv = kvzip_cli.load("doc.kvc", lm.model, lm.tokenizer)
>>> out = lm.model.generate(kv.prompt_ids(lm.tokenizer, "Who may copy it?"), past_key_values=kv.cache)
"""

__version__ = "0.5.0"

from .compress import CompressResult, compress, compress_text  # noqa: E402
from .errors import KvcError  # noqa: E402
from .load import Answer, LoadedKV, ask, load  # noqa: E402
from .models import LoadedModel, load_model  # noqa: E402

__all__ = [
    "Answer",
    "CompressResult",
    "KvcError",
    "LoadedKV",
    "LoadedModel",
    "__version__",
    "ask",
    "compress",
    "compress_text",
    "load",
    "load_model",
]
