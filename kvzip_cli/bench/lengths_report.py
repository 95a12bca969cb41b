"""Present `kvc bench --lengths`: a table of time to first token per length, and a PNG of it (log-scale lengths)."""

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .report import require_matplotlib, save_figure, wide_console

COLUMNS = [("tokens", "tokens", ",d"), ("file MB", "file_bytes", "mb"), ("compr.", "compression", ".1f"),
           ("compress s", "compress_seconds", ".1f"), ("prefill TTFT s", "prefill_ttft", ".2f"),
           ("kvc load s", "load_seconds", ".3f"), ("question s", "question_seconds", ".3f"),
           ("kvc TTFT s", "kvc_ttft", ".3f"), ("speedup", "speedup", ".1f"),
           ("load MB/s", "load_fp16_mb_per_s", ".0f"), ("same token", "same_first_token", ""),
           ("decoder", "decoder", "")]


def print_lengths(result: dict, console: Console | None = None) -> None:
    console = console or wide_console()
    table = Table(title=f"time to first token: {result['preset']} .kvc vs re-prefilling — {result['model']} on "
                        f"{result['device']}, {result['document']}")
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="right", no_wrap=True)
    for row in result["rows"]:
        cells = []
        for _, key, spec in COLUMNS:
            value = row[key]
            cells.append(f"{value / 1e6:.2f}" if spec == "mb" else "yes" if value is True else "no"
                         if value is False else format(value, spec))
        table.add_row(*cells)
    console.print(table)
    for note in result["notes"]:
        console.print(f"note: {note}")
    console.print(f"question: {result['question']!r}; kvc TTFT = load + question, median of 3; prefill TTFT: "
                  "document + question in 512-token chunks, once; load MB/s: fp16 bytes of the kept K/V per "
                  "second of load; same token: both paths pick the same first answer token.")


def plot_lengths(result: dict, output: Path) -> None:
    plt = require_matplotlib()
    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_time.plot(tokens, [r["prefill_ttft"] for r in rows], marker="o", label="re-prefill the document")
    ax_time.plot(tokens, [r["kvc_ttft"] for r in rows], marker="o", label=f"load the {result['preset']} .kvc")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("time to first token, s")
    ax_time.legend()
    ax_speed.plot(tokens, [r["speedup"] for r in rows], marker="o", color="tab:green")
    ax_speed.set_ylabel("speedup (prefill TTFT / kvc TTFT)")
    for ax in (ax_time, ax_speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [f"{t / 1000:.1f}k" for t in tokens])
        ax.set_xlabel("document tokens")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"kvc bench --lengths — {result['model']} on {result['device']}", fontsize=10)
    save_figure(plt, fig, output)
