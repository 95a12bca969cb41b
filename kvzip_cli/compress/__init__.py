"""A document → a `.kvc` file: `settings` (what is kept and how it is stored), `prefilled` (the document's prefill),
kvzip_cli.prune (the scores and the budget), `quantize` and `write` (the file), `calibrate` (settings searched for a
fidelity target), `pipeline` (the steps in order). The public names are imported on first use: the settings need no
torch."""

from ..lazy import lazy_names

_PUBLIC = {"compress": "pipeline", "compress_text": "pipeline", "CompressResult": "result", "Settings": "settings",
           "QuantOptions": "settings", "Target": "settings"}

__getattr__ = lazy_names(__name__, _PUBLIC)

__all__ = list(_PUBLIC)
