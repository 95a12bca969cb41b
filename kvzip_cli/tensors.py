"""Convert between torch tensors and the byte streams / numpy arrays of kvc_format (which has no torch)."""

import torch

from kvc_format import StoredArray, Stream

from .devices import DTYPE_NAMES, DTYPES


def to_stream(name: str, tensor: torch.Tensor) -> Stream:
    """A C-ordered little-endian byte view of `tensor` (bfloat16 as its 16-bit pattern)."""
    t = tensor.detach().contiguous().cpu()
    bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return Stream(name, DTYPE_NAMES[t.dtype], tuple(t.shape), memoryview(bits.numpy()).cast("B"))


def from_stored(stored: StoredArray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The array as a tensor on `device`, in `dtype` (default: its declared type)."""
    t = torch.from_numpy(stored.data)
    if stored.dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    if t.dtype != DTYPES[stored.dtype]:
        raise ValueError(f"array of {stored.data.dtype} does not hold {stored.dtype}")
    return t.to(device=device, dtype=dtype)


def storage_tensor(t: torch.Tensor, bits: int) -> torch.Tensor:
    """The KV as stored at `bits` 16 or 32 (see SPEC.md, "Stored precision").

    16: bfloat16 and float16 as computed; float32 rounded to float16, or to bfloat16 for a tensor that float16
    cannot hold without overflow. 32: float32 as computed.
    """
    if bits == 32 or t.dtype != torch.float32:
        return t
    half = t.to(torch.float16)
    if torch.isfinite(half).all() or not torch.isfinite(t).all():
        return half
    return t.to(torch.bfloat16)
