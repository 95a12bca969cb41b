"""`kvc bench fidelity` (the default: `kvc bench DOC`) and `kvc bench lengths`: measure, then render."""

from pathlib import Path
from typing import Annotated

import typer

from ..bench.sweep import REFITS
from ..compress.presets import PRESETS
from ..errors import KvcError, UsageError
from .common import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    OneLineErrors,
    choice,
    cli_errors,
    emit_json,
    value,
)


class DefaultsToFidelity(OneLineErrors):
    """`kvc bench DOC ...` is `kvc bench fidelity DOC ...`: the group's first argument, when not a command, is the
    fidelity bench's document."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["fidelity", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=DefaultsToFidelity, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Measure compressed caches: fidelity (the default) or time to "
                  "first token against document length. Metrics and methods: docs/bench.md.")

RefitName = choice("RefitName", REFITS)
DocumentArgument = Annotated[Path, typer.Argument(help="Text file to measure on.", show_default=False,
                                                  metavar="DOCUMENT")]
PlotOption = Annotated[Path | None, typer.Option(help="Also write a PNG of the results.", show_default=False)]


def _numbers(text: str, kind: type, option: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, not {text!r}") from None
    if not values:
        raise UsageError(f"{option} is empty")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _check_plot(plot: Path | None) -> None:
    if plot is not None:
        from ..bench.report import require_matplotlib

        require_matplotlib()
        if not plot.parent.is_dir():
            raise KvcError(f"plot folder {plot.parent} does not exist")


def _render(result: dict, json_output: bool, show, plot: Path | None) -> None:
    if json_output:
        emit_json(result)
        return
    show(result)
    if plot is not None:
        typer.echo(f"plot written to {plot}")


@app.command()
@cli_errors
def fidelity(
    document: DocumentArgument,
    model: ModelOption = "smollm2",
    ratios: Annotated[str, typer.Option(help="Kept fractions, comma-separated.")] = "0.5,0.3,0.2,0.1",
    bits: Annotated[str, typer.Option(help="Bit widths, comma-separated (16, 32, 8, 4, 3, 2).")] = "16",
    presets: Annotated[str | None, typer.Option(help="Presets, comma-separated; empty for none. (default: all three; "
                                                "with --lengths: balanced)", show_default=False)] = None,
    scorers: Annotated[str, typer.Option(help="Scorers, comma-separated; empty for none.")] = "kvzip",
    allocations: Annotated[str, typer.Option(help="Allocations, comma-separated (default: each scorer's).")] = "",
    peers: Annotated[bool, typer.Option("--peers", help="Also measure kvpress's presses.")] = False,
    refit: Annotated[RefitName, typer.Option(help="Refit of pruned settings: on, values, off, "
                                       "both or all.")] = RefitName.on,
    probes: Annotated[Path | None, typer.Option(help="A file of extra probe questions.", show_default=False)] = None,
    new_tokens: Annotated[int, typer.Option(min=1, max=256, help="Length of the reference answers.")] = 32,
    lengths: Annotated[str | None, typer.Option(help="Same as `kvc bench lengths --lengths`.",
                                                show_default=False)] = None,
    plot: PlotOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    json_output: JsonOption = False,
):
    """Measure fidelity (kld, top1, agreement, needles), size and speed against the full cache.

    Three needle sentences are planted in the document; every setting answers the same probes, and the full cache's
    greedy answers are the reference.
    """
    if lengths is not None:
        length(document, model, lengths, "balanced" if presets is None else presets, plot, device, dtype,
               json_output)
        return
    from ..bench.sweep import build_sweep
    from ..document import read_document
    from ..evaluation.probes import read_probes

    _check_plot(plot)
    sweep = build_sweep(ratios=_numbers(ratios, float, "--ratios"), bits=_numbers(bits, int, "--bits"),
                        scorers=_names(scorers), peers=peers, allocations=_names(allocations) or (None,),
                        presets=tuple(PRESETS) if presets is None else _names(presets), refits=REFITS[value(refit)])
    text = read_document(str(document))
    user_probes = read_probes(probes) if probes else []
    if peers:
        from ..bench.peers import require_kvpress

        require_kvpress()
    from ..bench.report import plot as write_plot
    from ..bench.report import print_table
    from ..bench.runner import run_bench
    from ..models.loading import load_model
    from ..progress import progress_bars

    lm = load_model(model, device=device, dtype=dtype)
    with progress_bars(True) as task:
        result = run_bench(text, str(document), lm, sweep, user_probes, task, new_tokens).as_json()
    if plot is not None:
        write_plot([result], plot)
    _render(result, json_output, print_table, plot)


@app.command("lengths")
@cli_errors
def lengths_command(
    document: DocumentArgument,
    lengths: Annotated[str, typer.Option(help="Document lengths in tokens, e.g. 1k,2k,4k,8k.")] = "1k,2k,4k,8k",
    model: ModelOption = "smollm2",
    preset: Annotated[str, typer.Option(help="The preset files are made with.")] = "balanced",
    plot: PlotOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    json_output: JsonOption = False,
):
    """Time to first token from a .kvc against re-prefilling the document, at several lengths (those past the
    model's context are skipped)."""
    length(document, model, lengths, preset, plot, device, dtype, json_output)


def length(document: Path, model: str, lengths: str, preset: str, plot: Path | None, device: str, dtype: str,
           json_output: bool) -> None:
    from ..bench.lengths import check_lengths, parse_lengths
    from ..compress.presets import get_preset
    from ..document import read_document

    counts = parse_lengths(lengths)
    if "," in preset:
        raise UsageError("--lengths measures one preset: pass a single --presets value")
    get_preset(preset)
    _check_plot(plot)
    text = read_document(str(document))
    from kvc_format import quantized

    from ..bench.lengths import as_json, run_lengths
    from ..bench.lengths_report import plot_lengths, print_lengths
    from ..models.loading import load_model
    from ..progress import progress_bars

    lm = load_model(model, device=device, dtype=dtype)
    quantized.warm_up()  # the compiled decoder's one-time start-up stays out of the first length's load time
    check_lengths(lm, counts)
    with progress_bars(True) as task:
        rows, notes = run_lengths(text, lm, counts, preset, task=task)
    result = as_json(rows, notes, lm, preset, str(document))
    if plot is not None:
        plot_lengths(result, plot)
    _render(result, json_output, print_lengths, plot)
