"""Decode a batch of quantized layers (`KvcReader.read_undecoded`) on a device with the Triton kernels.

The host has already read the sections, checked their CRCs and every table, layout and parameter
(kvc_format.rans.prepare_batch, kvc_format.quantized.check_parameters); the device decodes the rANS symbols of all
layers in one launch, then dequantizes each layer into its kept rows. Kernels are queued without waiting, so the
host reads the next batch while the device works; `DeviceChecks.raise_if_bad` synchronises once at the end.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from kvc_format import quantized, rans
from kvc_format.errors import MetadataError
from kvc_format.scalar_quantizers import head_index

from . import dequantize, rans_decode, to_device


@dataclass
class DeviceChecks:
    """What the device must confirm before the cache is used: every payload decoded cleanly, every value finite."""

    decodes: list[rans_decode.DecodeStatus] = field(default_factory=list)
    finite: list[torch.Tensor] = field(default_factory=list)

    def raise_if_bad(self) -> None:
        for status in self.decodes:
            status.check()
        if self.finite and not bool(torch.stack(self.finite).all()):
            raise MetadataError("a layer decodes to non-finite keys or values")


def decode_layers(layers: list[quantized.UndecodedLayer], dim: int, device: torch.device,
                  checks: DeviceChecks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each (kept, dim) float32 on `device`, rows in stored order (keys as stored: with
    RoPE unless the file removed it)."""
    for p in layers:
        quantized.check_parameters(p.arrays)
        if "value_symbols" not in p.rans:
            quantized.check_value_symbols(p.arrays, p.arrays["value_symbols"])
    coded = [(p, name) for p in layers for name in p.rans]
    batch = rans.prepare_batch([tuple(p.rans[name]) for p, name in coded])
    symbols = torch.empty(int(batch.item_symbols.sum()), dtype=torch.uint8, device=device)
    item_base = np.cumsum(batch.item_symbols) - batch.item_symbols
    lane_out = _lane_offsets(batch, [p.rows_q for p, _ in coded], dim, item_base)
    checks.decodes.append(rans_decode.decode(batch, lane_out, np.full(len(coded), dim), symbols))
    decoded = {(p.layer, name): symbols[b : b + n].view(-1, dim)
               for (p, name), b, n in zip(coded, item_base.tolist(), batch.item_symbols.tolist(), strict=True)}
    return [_dequantize_layer(p, decoded, dim, device, checks) for p in layers]


def _lane_offsets(batch: rans.LaneBatch, rows_q: list[np.ndarray], dim: int, item_base: np.ndarray) -> np.ndarray:
    """Where each lane's first symbol goes in the (rows, dim) symbol matrix of its item; later ones follow `dim`
    apart. Lanes run head by head, column by column, each column cut into lanes (kvc_format.quantized.lane_layout)."""
    out = np.empty(batch.lengths.size, np.int64)
    lane_first = np.cumsum(batch.lengths) - batch.lengths
    item_lanes = batch.item_lanes
    first_lane = np.cumsum(item_lanes) - item_lanes
    for k, rows in enumerate(rows_q):
        lanes = slice(first_lane[k], first_lane[k] + item_lanes[k])
        start = lane_first[lanes] - item_base[k]
        block_end = np.cumsum(rows * dim)
        head = np.searchsorted(block_end, start, side="right")
        within = start - (block_end - rows * dim)[head]
        row0 = (np.cumsum(rows) - rows)[head]
        out[lanes] = item_base[k] + (row0 + within % rows[head]) * dim + within // rows[head]
    return out


def _dequantize_layer(p: quantized.UndecodedLayer, decoded: dict, dim: int, device: torch.device,
                      checks: DeviceChecks) -> tuple[torch.Tensor, torch.Tensor]:
    def put(array: np.ndarray) -> torch.Tensor:
        return to_device(array, device)

    def symbols(name: str) -> torch.Tensor:
        return decoded[(p.layer, name)] if name in p.rans else put(p.arrays[name])

    a = p.arrays
    kept = p.exact.size
    keys = torch.empty((kept, dim), dtype=torch.float32, device=device)
    values = torch.empty((kept, dim), dtype=torch.float32, device=device)
    dst_rows = put(np.flatnonzero(~p.exact))
    dequantize.dequantize_keys(symbols("key_symbols"), put(a["key_step"]), put(a["key_zero"]),
                               put(head_index(p.rows_q).astype(np.int32)), dst_rows, keys)
    zero = put(a["value_zero"]) if a["value_zero"].shape[0] else None
    dequantize.dequantize_values(symbols("value_symbols"), put(a["value_step"]), zero, dst_rows, values)
    if p.exact.any():
        exact_rows = put(np.flatnonzero(p.exact))
        keys[exact_rows] = _widen(put(a["exact_keys"]))
        values[exact_rows] = _widen(put(a["exact_values"]))
    checks.finite.append(torch.isfinite(keys).all() & torch.isfinite(values).all())
    return keys, values


def _widen(rows: torch.Tensor) -> torch.Tensor:
    """Exact rows to float32; bfloat16 ones arrive as their uint16 bit patterns."""
    if rows.dtype == torch.uint16:
        return rows.view(torch.bfloat16).float()
    return rows.float()
