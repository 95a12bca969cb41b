"""What the transform and logit-bias studies share: today's quantizer re-implemented in numpy, with the bytes the
format would store its symbols in, the bench documents they run on, and their figure's axes. Both studies import it
with studies/ on sys.path (a script's own folder is the only one Python adds)."""

from pathlib import Path

import numpy as np

from kvc_format import codecs
from kvc_format.quantized import encode_symbols

BENCH_DOCS = [Path(__file__).resolve().parent.parent / "examples" / "docs" / f"{name}.txt"
              for name in ("apache-2.0", "mpl-2.0", "gpl-2")]


def coded_bytes(symbols: np.ndarray, rows: list[int]) -> int:
    """Bytes of `symbols` (rows of heads stacked, `rows` per head) through kvc's rANS coder, tables included."""
    _, coded, tables = encode_symbols(symbols, np.asarray(rows, np.int64), 256, "rans")
    size = len(coded[0])
    return size + (len(codecs.encode("zstd", tables.astype("<u2").tobytes(), 2)[0]) if tables.size else 0)


def zstd_bytes(array: np.ndarray) -> int:
    """Bytes of `array` zstd-coded as the format codes its small streams."""
    return len(codecs.encode("zstd", np.ascontiguousarray(array).tobytes(), 2)[0])


def scalar_keys(x: np.ndarray, logstep: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Today's keys: one head's kept keys (RoPE removed) with a zero point and a step per channel → the
    dequantized keys, their symbols and the bytes of the zero points and steps."""
    mean = x.mean(0)
    s = np.maximum(np.exp(logstep), np.abs(x - mean).max(0) / 127)
    q = np.clip(np.rint((x - mean) / s), -128, 127)
    return q * s + mean, (q + 128).astype(np.uint8), 8 * x.shape[1]  # zero point and step, float32


def row_values(v: np.ndarray, logstep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Today's values: a float16 step per row (token) → the dequantized values and their symbols."""
    s = np.exp(logstep)[:, None].astype(np.float16).astype(np.float64)
    s = np.maximum(s, np.abs(v).max(1, keepdims=True) / 127)
    q = np.clip(np.rint(v / s), -128, 127)
    return q * s, (q + 128).astype(np.uint8)


def finish_plot(fig, ax_kld, ax_top1, what: str, results: list[dict], path: Path) -> None:
    """Axes, legend and title of a kld/top1-against-compression figure, saved to `path`."""
    for ax in (ax_kld, ax_top1):
        ax.set_xscale("log")
        ax.set_xlabel("compression (fp16 KV bytes / stored bytes)")
        ax.grid(True, which="both", alpha=0.3)
    ax_kld.set_yscale("log")
    ax_kld.set_ylabel("kld against the full cache, nats")
    ax_top1.set_ylabel("top1 against the full cache")
    ax_kld.legend(fontsize=8)
    fig.suptitle(f"{what}, " + ", ".join(r["document"] for r in results)
                 + " (SmolLM2-135M; mean where several)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
