"""`kvc export`: a .kvc file for another runtime (kvzip_cli.export), with a progress bar."""

from pathlib import Path
from typing import Annotated

import typer

from ..export import CACHE_TYPES, DTYPES, TARGETS
from ..export import export as run_export
from ..report import mb
from .common import JsonOption, choice, cli_errors, emit_json, open_reader, value

TargetName = choice("TargetName", TARGETS)
DtypeName = choice("DtypeName", DTYPES)
CacheTypeName = choice("CacheTypeName", CACHE_TYPES)


@cli_errors
def export(
    file: Annotated[Path, typer.Argument(help="The .kvc file.", show_default=False, metavar="FILE")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write.", show_default=False)],
    to: Annotated[TargetName, typer.Option(help="safetensors (any reader), llama.cpp (a "
                                    "sequence state) or mlx (an MLX-LM prompt cache).")] = TargetName.safetensors,
    dtype: Annotated[DtypeName | None, typer.Option(help="safetensors and mlx: element type.",
                                              show_default=False)] = None,
    gguf: Annotated[Path | None, typer.Option(help="llama.cpp: the GGUF model file it loads.",
                                              show_default=False)] = None,
    cache_type: Annotated[CacheTypeName, typer.Option(help="llama.cpp: its K/V cache "
                                            "type.")] = CacheTypeName.f16,
    flash_attn: Annotated[bool, typer.Option("--flash-attn/--no-flash-attn", help="llama.cpp: whether its context "
                                             "uses flash attention.")] = True,
    mlx_model: Annotated[str | None, typer.Option(help="mlx: the model folder or hub id MLX-LM loads.",
                                                  show_default=False)] = None,
    json_output: JsonOption = False,
):
    """Write a .kvc cache for another runtime (no model needed; the file appears only once complete).

    Dense files export everywhere; llama.cpp also takes files pruned with --allocation position. Ask questions
    with the file's template around them (--json prints it). Formats and limits: docs/edge.md.
    """
    from ..progress import progress_bars

    to, dtype, cache_type = value(to), value(dtype), value(cache_type)
    with open_reader(file) as reader:
        layers = reader.geometry.layers
    with progress_bars(not json_output) as task:
        advance = task("export", layers)
        result = run_export(file, output, to, dtype=dtype, gguf=gguf, cache_type=cache_type, flash_attn=flash_attn,
                            model=mlx_model, on_layer=lambda layer: advance(1))
    if json_output:
        emit_json(result)
    elif to == "llama.cpp":
        gaps = "" if result["cells"] == result["tokens"] else f" (gaps: {result['tokens']:,} tokens)"
        typer.echo(f"{output}: {mb(result['bytes'])}, {result['cells']:,} cells of {result['cache_type']} K/V{gaps}, "
                   f"v_trans {int(result['v_trans'])}, for {result['runtime']} ({result['seconds']:.1f} s)")
    elif to == "mlx":
        typer.echo(f"{output}: {mb(result['bytes'])} MLX-LM prompt cache of {result['dtype']} K/V for {layers} layers "
                   f"({result['seconds']:.1f} s)")
    else:
        typer.echo(f"{output}: {mb(result['bytes'])} of {result['dtype']} K/V and positions for {layers} layers "
                   f"({result['seconds']:.1f} s)")
