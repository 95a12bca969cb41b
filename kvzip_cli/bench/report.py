"""Present bench rows: a rich table for people, and a PNG of fidelity against compression."""

import os
from dataclasses import dataclass
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
                        f"full-cache needle {result['needle_full']:.2f}, ends {_fmt(result.get('ends_full'), '.2f')}, "
                        f"rep4 {_fmt(result.get('repetition_full'), '.3f')}, prefill {result['prefill_seconds']:.1f} s")
    columns = [("setting", "setting", "", "left"), ("kept", "kept_ratio", ".2f", "right"),
               ("kld", "kld", ".4f", "right"), ("top1", "top1", ".3f", "right"),
               ("Δnll", "delta_nll", "+.4f", "right"), ("agree@32", "agreement", ".2f", "right"),
               ("ends", "ends", ".2f", "right"), ("rep4", "repetition", ".3f", "right"),
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
    console.print("kld, top1, Δnll, agree@32: against the full cache along its greedy answers; ends: of the probes "
                  "whose full-cache answer ends within the limit, the fraction whose answer ends too; rep4: repeated "
                  "4-grams / 4-grams of the greedy answers; compression: fp16 KV bytes / file bytes (kvpress keeps "
                  "entries in memory, no file: 1 / kept).")


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KvcError("--plot needs matplotlib: pip install 'kvc[bench]'") from None
    return plt


@dataclass
class Point:
    compression: float
    kld: float
    top1: float
    label: str  # written next to the point: its kept ratio, bit width or preset


@dataclass
class Series:
    name: str  # legend entry
    points: list[Point]  # by compression
    joined: bool  # one setting varied along the series (ratio, bits): a line through the points; else markers only
    peer: bool  # a kvpress press


def _series_of(row: dict) -> tuple[str, str, bool]:
    """(series name, point label, joined) of a bench row."""
    if row["kind"] == "peer":
        return row["family"], f"{row['ratio']:g}", True
    if row["kind"] == "kvc" and row["family"].startswith("kvc presets"):  # each refit choice a series of its own
        label = row["setting"].removeprefix("preset ")
        return row["family"], label.removesuffix(" no-refit").removesuffix(" values-refit"), False
    if row["kind"] == "kvc" and row.get("scorer") is None and row["ratio"] == 1:
        return f"kvc full cache, {row['codec']}", f"{row['bits']}-bit", True
    if row["kind"] == "kvc" and row.get("scorer") is not None:
        return row["family"], f"{row['ratio']:g}", True  # one scorer (allocation, bit width) over the ratios
    return row["family"], row["setting"], False


def plot_series(results: list[dict]) -> list[Series]:
    """The plot's series over one or more documents: a setting's points are averaged over the documents. Only the
    points of one series (a scorer over ratios, a press over ratios, a codec over bit widths) are joined by a line;
    presets are separate points with their names."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    labels: dict[tuple[str, str], str] = {}
    joined: dict[str, bool] = {}
    peers: dict[str, bool] = {}
    for result in results:
        for row in result["rows"]:
            if row["kld"] is None:  # size baselines, failed rows
                continue
            name, label, join = _series_of(row)
            grouped.setdefault(name, {}).setdefault(row["setting"], []).append(row)
            labels[name, row["setting"]] = label
            joined[name] = join
            peers[name] = row["kind"] == "peer"
    series = []
    for name, settings in grouped.items():
        points = sorted(
            (Point(sum(r["compression"] for r in rows) / len(rows), sum(r["kld"] for r in rows) / len(rows),
                   sum(r["top1"] for r in rows) / len(rows), labels[name, setting])
             for setting, rows in settings.items()),
            key=lambda p: (p.compression, p.label),
        )
        series.append(Series(name, points, joined[name] and len(points) > 1, peers[name]))
    return sorted(series, key=lambda s: (s.peer, s.name))


def _style(series: Series) -> dict:
    if series.name.startswith("kvc presets"):
        return {"marker": "*", "markersize": 11, "linestyle": "none"}
    if not series.joined:
        return {"marker": "o", "linestyle": "none"}
    if series.peer:
        return {"marker": "o", "linestyle": "--"}
    if series.name.startswith("kvc full cache"):
        return {"marker": "s", "linestyle": ":"}
    return {"marker": "o", "linestyle": "-"}


def _label_place(series: Series) -> dict:
    """Where a point's label goes, so that the labels of points that (nearly) coincide do not overprint: presets
    below right (the lossless preset is the 16-bit zstd full cache), the full cache above left with zstd and below
    left with the other codec (same symbols, same fidelity), ratios above right."""
    if series.name.startswith("kvc presets"):
        return {"xytext": (5, -11), "ha": "left"}
    if series.name == "kvc full cache, zstd":
        return {"xytext": (-4, 5), "ha": "right"}
    if series.name.startswith("kvc full cache"):
        return {"xytext": (-4, -11), "ha": "right"}
    return {"xytext": (4, 4), "ha": "left"}


def figure(results: list[dict]):
    """(pyplot, figure) of kld (log) and top1 against compression; `plot` writes it."""
    plt = require_matplotlib()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    series = plot_series(results)
    peers_ran = any(s.peer for s in series)
    fig, (ax_kld, ax_top1) = plt.subplots(1, 2, figsize=(12, 5.2))
    for s in series:
        xs = [p.compression for p in s.points]
        klds = [max(p.kld, KLD_FLOOR) for p in s.points]
        top1s = [p.top1 for p in s.points]
        (line,) = ax_kld.plot(xs, klds, label=s.name, **_style(s))
        ax_top1.plot(xs, top1s, label=s.name, color=line.get_color(), **_style(s))
        for ax, ys in ((ax_kld, klds), (ax_top1, top1s)):
            for p, x, y in zip(s.points, xs, ys, strict=True):
                ax.annotate(p.label, (x, y), textcoords="offset points", fontsize=7, color=line.get_color(),
                            **_label_place(s))
    docs = ", ".join(Path(r["document"]).name for r in results)
    if len(results) > 1:
        docs = f"mean over {len(results)} documents: {docs}"
    stored = "fp16 KV bytes / stored bytes" + ("; kvpress: 1 / kept" if peers_ran else "")
    for ax in (ax_kld, ax_top1):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(X_TICKS))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"compression ({stored})")
        ax.grid(True, which="both", alpha=0.3)
    ax_kld.set_yscale("log")
    ax_kld.set_ylabel(f"KL(full ‖ compressed), nats (below {KLD_FLOOR:g} drawn at it)")
    ax_top1.set_ylabel("top-1 agreement with the full cache")
    if series:
        ax_top1.legend(loc="best", fontsize=8)
    fig.suptitle(f"kvc bench — {results[0]['model']} — {docs}\npoint labels: kept ratio (pruned"
                 f"{', kvpress' if peers_ran else ''}), bit width (full cache), preset name", fontsize=9)
    return plt, fig


def plot(results: list[dict], output: Path) -> None:
    """kld (log) and top1 against compression, one series per scorer, press or codec, over one or more documents
    (averaged)."""
    plt, fig = figure(results)
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
