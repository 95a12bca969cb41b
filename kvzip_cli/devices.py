"""Resolve `--device` and `--dtype` the way transformers users expect."""

import torch

from .errors import KvcError, UsageError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(spec: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KvcError(f"device {spec!r} asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {spec!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on the CPU and bfloat16 (float16 where unsupported) on CUDA.

    On the CPU, bfloat16 is faster but a cached and an uncached run then differ by rounding (measured: logits
    off by up to 1.3 and 5 of 8 greedy answers changed), which would break the exactness kvc promises.
    """
    if spec == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec not in DTYPES:
        raise UsageError(f"unknown dtype {spec!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[spec]
