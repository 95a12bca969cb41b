"""Does CacheGen's delta-to-anchor grouping make kvc's symbols cheaper? Measures it on a real cache.

    python studies/anchor-deltas/anchor_deltas.py examples/docs/apache-2.0.txt [--bits 4] [--group 10]

CacheGen (paper) groups tokens by `--group`, keeps the first token of each group (the anchor) and codes the others as
the difference from it. This script quantizes the embedded model's cache exactly as `kvc compress --bits B` does
(keys with RoPE removed, per channel; values per token, uniform), then compares the empirical entropy of the symbols
with one table per (layer, head, channel), as kvc's rANS coder uses, for the symbols as they are and for the
anchor deltas. Entropy is what an ideal coder pays (tables not counted, the same for both), so this isolates the
transform.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from kvc_format.scalar_quantizers import quantize_keys, quantize_values_uniform
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.quantize import key_step, value_step
from kvzip_cli.models.loading import load_model
from kvzip_cli.rope import rope_tables, unrotate


def entropy_bits(symbols: np.ndarray) -> float:
    """Total bits of `symbols` (tokens, channels) with one empirical table per channel."""
    total = 0.0
    for column in symbols.T:
        _, counts = np.unique(column, return_counts=True)
        total -= float((counts * np.log2(counts / counts.sum())).sum())
    return total


def anchor_deltas(symbols: np.ndarray, group: int) -> np.ndarray:
    """Each token minus the first token of its group of `group` (anchors stay as they are)."""
    out = symbols.astype(np.int32)
    anchors = out[(np.arange(len(out)) // group) * group]
    deltas = out - anchors
    deltas[:: group] = out[:: group]
    return deltas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("document")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=10)
    args = parser.parse_args()
    lm = load_model("smollm2")
    pre = prefill_document(Path(args.document).read_text(encoding="utf-8"), lm)
    cos, sin = rope_tables(lm.model, torch.arange(pre.tokens))
    plain = {"keys": 0.0, "values": 0.0}
    delta = {"keys": 0.0, "values": 0.0}
    elements = 0
    for layer in pre.cache.layers:
        keys = unrotate(layer.keys[0].float(), cos, sin)
        for h in range(keys.shape[0]):
            k = keys[h, 4:].numpy()  # the first 4 positions are stored exactly
            v = layer.values[0, h, 4:].float().numpy()
            k_sym = quantize_keys(k, np.array([len(k)]), key_step(args.bits)).symbols
            v_sym = quantize_values_uniform(v, value_step(args.bits), v.shape[1]).symbols
            for name, sym in (("keys", k_sym), ("values", v_sym)):
                plain[name] += entropy_bits(sym)
                delta[name] += entropy_bits(anchor_deltas(sym, args.group))
            elements += k.size
    print(f"{args.document}: {pre.tokens} tokens, {args.bits}-bit steps, anchor groups of {args.group}")
    for name in ("keys", "values"):
        print(f"  {name:6s} symbols {plain[name] / elements:.3f} bits/element, anchor deltas "
              f"{delta[name] / elements:.3f} ({delta[name] / plain[name] - 1:+.1%})")


if __name__ == "__main__":
    main()
