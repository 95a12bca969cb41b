"""Triton kernels for loading a quantized `.kvc` straight onto a GPU: rANS decoding and dequantization.

Triton is optional (`pip install 'kvc[gpu]'`) and only needed there: on the CPU, loading uses kvc_format's numpy
decoder. The kernels can also run on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`), which is slow and
only meant for testing them where there is no GPU.
"""

import importlib.util
import os

import numpy as np
import torch

from ...errors import KvcError


def to_device(array: np.ndarray, device: torch.device, dtype=None) -> torch.Tensor:
    """A contiguous copy of `array` (cast to the numpy `dtype` when given) on `device`, queued without waiting."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(device, non_blocking=True)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: Triton is installed, and the device is CUDA or Triton interprets."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def require(device: torch.device) -> None:
    """KvcError unless the kernels can run on `device`."""
    if importlib.util.find_spec("triton") is None:
        raise KvcError("the triton decoder needs Triton: pip install 'kvc[gpu]' (on a machine with a CUDA GPU)")
    if not available(device):
        raise KvcError(f"the triton decoder runs on CUDA devices, not {device} (TRITON_INTERPRET=1 runs it on the "
                       "CPU, slowly, for tests)")
