"""A `.kvc` file → a cache the model answers from: `loader` (fingerprint check, the layers decoded and placed),
`pruned_cache` (per-head kept entries as a transformers Cache), `kernels` (GPU decoding), `answer` (a question
asked of it). The public names are imported on first use, so that `DECODERS` costs no torch import."""

from ..lazy import lazy_names

DECODERS = ("auto", "numpy", "triton")
_PUBLIC = {"load": "loader", "LoadedKV": "loader", "choose_decoder": "loader", "measure_prefill": "loader",
           "ask": "answer", "Answer": "answer"}

__getattr__ = lazy_names(__name__, _PUBLIC)

__all__ = ["DECODERS", *_PUBLIC]
