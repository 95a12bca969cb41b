"""`kvc load`: verify the model fingerprint and stream the `.kvc` layer by layer into a transformers cache."""

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoTokenizer, Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kvc_format import CacheGeometry, KvcReader

from ..attention import use_kvc_attention
from ..context import dense_layer, layer_windows
from ..devices import DTYPE_NAMES
from ..document import question_ids
from ..errors import KvcError
from ..models.fingerprint import differences, fingerprint
from ..models.loading import LoadedModel
from ..prefill import prefill
from ..progress import TaskFactory, silent_task
from ..rope import rope_tables
from ..tensors import from_stored
from . import DECODERS, kernels
from .pruned_cache import PrunedCache, PrunedLayer, cache_bytes


@dataclass
class LoadedKV:
    """A cache to pass as `past_key_values`, and the prompt tokens it stands for.

    `generate` appends to the cache; call `reset()` before asking a second question. A pruned file loads as a
    `PrunedCache` and switches the model to kvc's attention function (outputs of ordinary caches are unchanged).
    """

    cache: Cache
    input_ids: torch.Tensor  # (1, tokens): the document prefix the cache holds
    question_prefix: str
    question_suffix: str
    header: dict
    load_seconds: float
    decoder: str  # how a quantized file's symbols were decoded: "numpy" (CPU) or "triton" (GPU kernels)

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, question: str) -> torch.Tensor:
        """(1, tokens + question tokens): what to pass as `input_ids` to `model.generate`."""
        q = question_ids(tokenizer, self.question_prefix, self.question_suffix, question)
        return torch.cat([self.input_ids, torch.tensor([q], device=self.input_ids.device)], dim=1)

    def cache_bytes(self) -> int:
        """Bytes of the cache's K/V (a pruned cache: exactly its kept entries and appended tokens)."""
        return cache_bytes(self.cache)

    def reset(self) -> None:
        """Drop whatever generate appended, back to the document prefix."""
        self.cache.crop(self.input_ids.shape[1])


def check_identity(header: dict, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    recorded = header["model"]
    diff = differences(recorded, fingerprint(model, tokenizer))
    if not diff:
        return
    made_with = recorded.get("name", "an unnamed model")
    hint = ""
    if diff == ["weight_digest"] and "float16" in (recorded.get("dtype"), DTYPE_NAMES.get(model.dtype)):
        hint = f"; if it is the same checkpoint, load it with --dtype {recorded.get('dtype')}"
    raise KvcError(
        f"this file was made with model {made_with!r} and the given model differs in {', '.join(diff)}: "
        f"a cache only works with the model that computed it{hint}"
    )


def _windows_text(windows) -> str:
    slid = sorted({w for w in windows if w is not None})
    if not slid:
        return "no sliding windows"
    return f"windows of {', '.join(map(str, slid))} on {sum(w is not None for w in windows)} layers"


def check_windows(geometry: CacheGeometry, windows: list[int | None]) -> None:
    """Refuse a file whose sliding windows are not the model's (it would hold other positions than the model's
    attention reads). Files before format 1.6 store every position, which suits any window."""
    if geometry.windows is not None and list(geometry.windows) != windows:
        raise KvcError(f"this file was made for a model with {_windows_text(geometry.windows)}, and the given "
                       f"model has {_windows_text(windows)}: load it with the model that made it")




def load(
    path: str | os.PathLike,
    model: PreTrainedModel | LoadedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    task: TaskFactory = silent_task,
    decoder: str = "auto",
) -> LoadedKV:
    """Read `path` into a cache for `model` (on its device, in its dtype) after checking it is the same model.

    `decoder` decodes a quantized file's symbols: "numpy" on the CPU (kvc_format), "triton" on the model's GPU
    (kvzip_cli.load.kernels); "auto" takes triton for a model on CUDA when Triton is installed, numpy otherwise.
    """
    if isinstance(model, LoadedModel):
        model, tokenizer = model.model, model.tokenizer
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        except (OSError, ValueError):
            raise KvcError("pass the model's tokenizer: it cannot be found from model.name_or_path") from None
    decoder = choose_decoder(decoder, model.device)
    started = time.perf_counter()
    with KvcReader(path) as reader:
        check_identity(reader.header, model, tokenizer)
        geometry = reader.geometry
        windows = layer_windows(model.config)
        check_windows(geometry, windows)
        advance = task("load", geometry.layers)
        dense = DynamicCache()
        pruned = []
        # A quantized file of the whole cache (all that each layer holds) loads as an ordinary dense cache.
        keeps_all = (geometry.layout == "quantized" and not reader.bias_layers and all(
            n == geometry.kv_heads * geometry.held(i) for i, n in enumerate(reader.kept_per_layer())))
        rope_removed = geometry.layout == "quantized" and geometry.key_rope == "removed"
        rope = _rope(model, geometry.tokens) if rope_removed else None
        if geometry.layout != "quantized":
            decoder = "numpy"  # only quantized files hold symbols to decode: the others are read by kvc_format
        layers, confirm = _decoded_layers(reader, decoder, model.device, rope)
        for layer, k, v, positions in layers:
            k, v = k.to(model.dtype), v.to(model.dtype)
            if positions is None:
                dense.layers.append(dense_layer(k.unsqueeze(0), v.unsqueeze(0), windows[layer], geometry.tokens))
            elif keeps_all:
                shape = (1, geometry.kv_heads, geometry.held(layer), geometry.head_dim)
                dense.layers.append(dense_layer(k.reshape(shape), v.reshape(shape), windows[layer], geometry.tokens))
            else:
                counts = [len(p) for p in positions]
                # a sliding-window layer masks by position
                kept_positions = [torch.from_numpy(p.astype(np.int64)) for p in positions] if windows[layer] else None
                bias = reader.read_bias(layer)
                if bias is not None:
                    bias = list(torch.from_numpy(bias).to(model.device).split(counts))
                pruned.append(PrunedLayer(list(k.unsqueeze(0).split(counts, dim=1)),
                                          list(v.unsqueeze(0).split(counts, dim=1)), geometry.tokens,
                                          windows[layer], kept_positions, bias))
            advance(1)
        confirm()
        cache = PrunedCache(pruned) if pruned else dense
        if pruned:
            use_kvc_attention(model)
        prompt = reader.header["prompt"]
        input_ids = torch.tensor([prompt["prefix_ids"]], device=model.device)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return LoadedKV(
        cache=cache,
        input_ids=input_ids,
        question_prefix=prompt["question_prefix"],
        question_suffix=prompt["question_suffix"],
        header=reader.header,
        load_seconds=time.perf_counter() - started,
        decoder=decoder,
    )


def choose_decoder(decoder: str, device: torch.device) -> str:
    """"numpy" or "triton" for `decoder` ("auto", "numpy", "triton") on `device`; KvcError if triton cannot run."""
    if decoder not in DECODERS:
        raise KvcError(f"unknown decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    if decoder == "auto":
        return "triton" if device.type == "cuda" and kernels.available(device) else "numpy"
    if decoder == "triton":
        kernels.require(device)
    return decoder


def _decoded_layers(reader: KvcReader, decoder: str, device: torch.device,
                    rope: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> tuple[Iterator[tuple[int, torch.Tensor, torch.Tensor, tuple | None]], Callable[[], None]]:
    """(layer, keys, values, positions) for every layer in order, keys and values on `device` as stored (or float32
    when dequantized, and with `rope` rotated where they were stored without it), and a function that raises if the
    device found the file corrupt (call it once all are used: the triton decoder reports asynchronously)."""
    if decoder == "numpy":
        # kvc_format rotates as it dequantizes, from the tables' first halves (the second halves repeat them)
        halves = None if rope is None else tuple(t[:, : t.shape[1] // 2].contiguous().cpu().numpy() for t in rope)
        layers = ((layer, from_stored(s.keys, device), from_stored(s.values, device), s.positions)
                  for layer, s in reader.iter_layers(halves))
        return layers, lambda: None
    from .kernels.layers import DeviceChecks, decode_layers

    checks = DeviceChecks()

    def layers():
        for batch in reader.layer_batches():
            undecoded = reader.read_undecoded(batch)
            decoded = decode_layers(undecoded, reader.geometry.head_dim, device, checks)
            for p, (keys, values) in zip(undecoded, decoded, strict=True):
                if rope is not None and p.positions is not None:
                    keys = _rotate_rows(keys, p.positions, *rope)
                yield p.layer, keys, values, p.positions

    return layers(), checks.raise_if_bad


def _rope(model: PreTrainedModel, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (cos, sin) at positions 0 … tokens − 1, computed once per load."""
    tables = rope_tables(model, torch.arange(tokens))
    if tables is None:
        raise KvcError("this file stores keys before RoPE, but the model has no rotary embedding kvc can apply")
    cos, sin = tables
    half = cos.shape[-1] // 2
    # The halves may differ in the last bit where torch evaluates cos/sin along different code paths.
    if not all(torch.allclose(t[:, :half], t[:, half:], rtol=0, atol=1e-6) for t in tables):
        raise KvcError("this file stores keys before RoPE, but the model's rotary tables are not in the rotate-half "
                       "form kvc re-applies")
    return tables


def _rotate_rows(keys: torch.Tensor, positions: tuple, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Re-apply RoPE, in place, to keys stored with it removed, on the device (the GPU decoder's path; on the CPU
    kvc_format rotates them as it dequantizes): keys (kept, head_dim) float32, rows in head order.

    RoPE tables are concat(cos θ, cos θ) (and sin alike), so each half of the rotary channels needs only the first
    half of its row: two gathers of (kept, rotary_dim / 2) and two products of that size, no concatenation."""
    half = cos.shape[-1] // 2
    rows = torch.from_numpy(np.concatenate(positions)).to(device=cos.device, dtype=torch.int64)
    c, s = cos[rows, :half].to(keys.device), sin[rows, :half].to(keys.device)
    first, second = keys[:, :half], keys[:, half : 2 * half]
    first_sin, second_sin = first * s, second * s
    first.mul_(c).sub_(second_sin)
    second.mul_(c).add_(first_sin)
    return keys


@torch.inference_mode()
def measure_prefill(model: PreTrainedModel, kv: LoadedKV, chunk_size: int, task: TaskFactory = silent_task) -> float:
    """Seconds this machine takes to prefill the document the cache holds (what answering costs without kvc), in
    chunks of `chunk_size` tokens as `kvc compress` does."""
    prefix = kv.input_ids[0].tolist()
    advance = task("prefill", len(prefix))
    started = time.perf_counter()
    prefill(model, prefix, chunk_size, advance)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - started
