"""Size and speed of kvc's entropy coder on a real cache, against zstd and constriction on the same symbols.

    python studies/codec-speed/codec_speed.py examples/docs/apache-2.0.txt --ratio 0.3 --bits 4

Prefills the document with the embedded model (scores and prunes it when --ratio < 1), quantizes it, then:
- writes the file with `--codec ans` and with `--codec zstd` (same symbols; zstd on the symbol bytes): size of the
  symbol streams, tables and lane states included, and the write time (quantize + code + write);
- reads it back (`KvcReader.read_layers`, all layers in one vectorised rANS pass): decode throughput in MB/s of
  float16 output (the kept K/V as an fp16 cache would hold them) and in symbols/s;
- codes the same symbols with constriction's ANS coder (Rust), one categorical model per lane table as kvc uses,
  for size and speed. Timings are medians of --repeats runs on this machine.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvc_format import KvcReader, rans
from kvc_format.quantized import from_lanes, lane_layout, split_exact
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.settings import QuantOptions
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.models.loading import load_model
from kvzip_cli.prune.scoring import score_context


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def symbol_bytes(path: Path) -> dict[str, int]:
    with KvcReader(path) as r:
        out = {"symbols": 0, "tables": 0, "other": 0}
        for section in r.sections:
            for st in section.streams:
                kind = st.name.rsplit("_", 1)[-1]
                out[kind if kind in ("symbols", "tables") else "other"] += st.length
        return out


def constriction_cost(path: Path) -> tuple[int, int, float, float, int]:
    """(constriction bytes, kvc rANS bytes, encode s, decode s, symbols) for the file's rANS-coded symbol streams
    (streams the writer left to zstd are skipped), re-coded with constriction using kvc's tables."""
    import constriction

    items, kvc_bytes = [], 0
    with KvcReader(path) as r:
        g = r.geometry
        for layer, stored in enumerate(r.read_layers()):
            section = r._layers[layer]
            arrays, coded = r._read_arrays(section)
            _, rows_q = split_exact(stored.positions, g.exact_positions)
            for name in ("key_symbols", "value_symbols"):
                if name not in coded:
                    continue
                params = next(s.params for s in section.streams if s.name == name)
                freq = arrays[name.replace("symbols", "tables")]
                lengths, tables = lane_layout(rows_q, g.head_dim, params["lane_rows"], params["tables"])
                symbols = rans.decode(coded[name], lengths, tables, freq)
                kvc_bytes += len(coded[name])
                items.append((from_lanes(symbols, rows_q, g.head_dim), rows_q, freq, params["tables"]))
    columns = []
    for symbols, rows_q, freq, tables in items:
        start = 0
        for h, n in enumerate(rows_q):
            for c in range(symbols.shape[1]):
                t = {"channel": h * symbols.shape[1] + c, "head": h, "layer": 0}[tables]
                columns.append((symbols[start : start + n, c].astype(np.int32), freq[t]))
            start += n
    models = [constriction.stream.model.Categorical(f / f.sum(), perfect=False) for _, f in columns]
    total = sum(len(s) for s, _ in columns)

    def encode():
        coder = constriction.stream.stack.AnsCoder()
        for (s, _), m in zip(reversed(columns), reversed(models), strict=True):
            coder.encode_reverse(s, m)
        return coder.get_compressed()

    compressed = encode()
    enc = median_seconds(encode, 3)

    def decode():
        coder = constriction.stream.stack.AnsCoder(compressed)
        for (s, _), m in zip(columns, models, strict=True):
            coder.decode(m, len(s))

    dec = median_seconds(decode, 3)
    return compressed.size * 4, kvc_bytes, enc, dec, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("document")
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--key-bits", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    lm = load_model("smollm2")
    pre = prefill_document(Path(args.document).read_text(encoding="utf-8"), lm)
    pruning = score_context(lm, pre.cache, pre.layout, "kvzip").keep(args.ratio) if args.ratio < 1 else None
    quant = QuantOptions(key_bits=args.key_bits)
    print(f"{args.document}: {pre.tokens} tokens, kept {args.ratio:g}, {args.bits}-bit (keys "
          f"{args.key_bits or args.bits})")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {codec: Path(tmp) / f"{codec}.kvc" for codec in ("ans", "zstd")}
        write_seconds = {}
        for codec, path in paths.items():
            write_seconds[codec] = median_seconds(
                lambda codec=codec, path=path: write_kvc(pre, path, codec=codec, bits=args.bits, pruning=pruning,
                                                         quant=quant), args.repeats)
        with KvcReader(paths["ans"]) as r:
            elements = 2 * sum(r.kept_per_layer()) * r.geometry.head_dim
        fp16_mb = 2 * elements / 1e6
        sizes = {codec: symbol_bytes(path) for codec, path in paths.items()}
        for codec, path in paths.items():
            s = sizes[codec]
            read = median_seconds(lambda path=path: KvcReader(path).read_layers(), args.repeats)
            print(f"  {codec:5s} file {path.stat().st_size:>10,} B ({8 * path.stat().st_size / elements:.3f} bits/elem)"
                  f"  symbols+tables {s['symbols'] + s['tables']:>10,} B  write {write_seconds[codec]:.2f} s "
                  f"({fp16_mb / write_seconds[codec]:.0f} MB/s fp16)  read+decode {read:.3f} s "
                  f"({fp16_mb / read:.0f} MB/s fp16, {elements / read / 1e6:.0f} M symbols/s)")
        coded = {codec: s["symbols"] + s["tables"] for codec, s in sizes.items()}
        ratio = coded["zstd"] / coded["ans"]
        print(f"  rANS vs zstd on the same symbols (tables and lane states included): {ratio:.3f}x smaller")
        try:
            size, rans_bytes, enc, dec, n = constriction_cost(paths["ans"])
        except ImportError:
            print("  constriction is not installed: pip install constriction", file=sys.stderr)
            return
        print(f"  constriction on the same rANS-coded symbols and tables: {size:,} B (kvc rANS {rans_bytes:,} B "
              f"with its lane states), "
              f"encode {n / enc / 1e6:.0f} M symbols/s, decode {n / dec / 1e6:.0f} M symbols/s (one call per lane "
              "table, one thread)")


if __name__ == "__main__":
    main()
