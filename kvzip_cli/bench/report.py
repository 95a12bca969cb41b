"""Present bench rows: a rich table for people, and a PNG of fidelity against compression."""

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import KvcError

KLD_FLOOR = 1e-6  # a (near-)lossless kld below this is drawn here on the log axis
X_TICKS = (1, 2, 3, 5, 10, 20, 30, 50, 100, 200)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def wide_console() -> Console:
    """The terminal, or a console wide enough that tables written to a pipe or file are not squeezed."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=200)


def print_table(result: dict, console: Console | None = None) -> None:
    console = console or wide_console()
    table = Table(title=f"{result['document']}: {result['tokens']:,} tokens, {result['model']}, "
                        f"full-cache needle {result['needle_full']:.2f}, prefill {result['prefill_seconds']:.1f} s")
    columns = [("setting", "setting", "", "left"), ("kept", "kept_ratio", ".2f", "right"),
               ("kld", "kld", ".4f", "right"), ("top1", "top1", ".3f", "right"),
               ("Δnll", "delta_nll", "+.4f", "right"), ("agree@32", "agreement", ".2f", "right"),
               ("needle", "needle", ".2f", "right"), ("file MB", "file_bytes", "", "right"),
               ("compr.", "compression", ".2f", "right"), ("bits/el", "bits_per_element", ".2f", "right"),
               ("mem", "memory_ratio", ".2f", "right"),
               ("compress s", "compress_seconds", ".1f", "right"), ("load s", "load_seconds", ".3f", "right")]
    for title, _, _, justify in columns:
        table.add_column(title, justify=justify, no_wrap=True)
    for row in result["rows"]:
        cells = []
        for _, key, spec, _ in columns:
            value = row[key]
            if key == "file_bytes":
                cells.append("–" if value is None else f"{value / 1e6:.2f}")
            else:
                cells.append(_fmt(value, spec))
        table.add_row(*cells)
    console.print(table)
    for row in result["rows"]:
        if row.get("error"):
            console.print(f"[red]{row['setting']} failed:[/red] {row['error']}")
    console.print("kld, top1, Δnll, agree@32: against the full cache along its greedy answers; compression: "
                  "fp16 KV bytes / file bytes (kvpress keeps entries in memory, no file: 1 / kept).")


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KvcError("--plot needs matplotlib: pip install 'kvc[bench]'") from None
    return plt


def plot(results: list[dict], output: Path) -> None:
    """kld (log) and top1 against compression, one curve per family, over one or more documents (averaged)."""
    plt = require_matplotlib()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    families: dict[str, dict[str, list]] = {}
    for result in results:
        for row in result["rows"]:
            if row["kld"] is None:
                continue
            points = families.setdefault(row["family"], {})
            points.setdefault(row["setting"], []).append(row)
    fig, (ax_kld, ax_top1) = plt.subplots(1, 2, figsize=(12, 4.8))
    for family, settings in sorted(families.items()):
        averaged = sorted(
            (sum(r["compression"] for r in rows) / len(rows), sum(r["kld"] for r in rows) / len(rows),
             sum(r["top1"] for r in rows) / len(rows))
            for rows in settings.values()
        )
        xs = [p[0] for p in averaged]
        style = {"marker": "o", "label": family, "linestyle": "--" if family.startswith("kvpress") else "-"}
        ax_kld.plot(xs, [max(p[1], KLD_FLOOR) for p in averaged], **style)
        ax_top1.plot(xs, [p[2] for p in averaged], **style)
    docs = ", ".join(Path(r["document"]).name for r in results)
    if len(results) > 1:
        docs = f"mean over {len(results)} documents: {docs}"
    for ax in (ax_kld, ax_top1):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(X_TICKS))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("compression (fp16 KV bytes / stored bytes; kvpress: 1 / kept)")
        ax.grid(True, which="both", alpha=0.3)
    ax_kld.set_yscale("log")
    ax_kld.set_ylabel(f"KL(full ‖ compressed), nats (below {KLD_FLOOR:g} drawn at it)")
    ax_top1.set_ylabel("top-1 agreement with the full cache")
    ax_top1.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"kvc bench — {results[0]['model']} — {docs}", fontsize=10)
    save_figure(plt, fig, output)


def save_figure(plt, fig, output: Path) -> None:
    """Write `fig` to `output` atomically and close it."""
    fig.tight_layout()
    partial = output.with_name(f".{output.name}.partial.png")
    try:
        fig.savefig(partial, dpi=120)
        os.replace(partial, output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise KvcError(f"cannot write plot {output}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
