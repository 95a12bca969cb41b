"""`kvc compress`: parse, check the settings and inputs (before torch is imported), call the library, render."""

from pathlib import Path
from typing import Annotated

import typer

from ..compress.presets import PRESETS
from ..compress.settings import COMPRESS_CODECS, QuantOptions, Settings, Target
from ..errors import UsageError
from ..prune import ALLOCATIONS
from ..prune.scorers import SCORERS
from ..report import calibration_text, chosen_text, estimate_text, mb, self_check_text
from .common import DeviceOption, DtypeOption, JsonOption, ModelOption, choice, cli_errors, emit_json, fail, value

ENGINES = ("local", "ray")
PresetName = choice("PresetName", PRESETS)
ScorerName = choice("ScorerName", SCORERS)
AllocationName = choice("AllocationName", ALLOCATIONS)
CodecName = choice("CodecName", COMPRESS_CODECS)
EngineName = choice("EngineName", ENGINES)


@cli_errors
def compress(
    documents: Annotated[list[str] | None, typer.Argument(
        help="Text file to compress (- for stdin). Several files, a folder or a quoted glob make a corpus: one "
             ".kvc each in the folder -o.", show_default=False, metavar="DOCUMENT")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The .kvc file to write; for a corpus, a folder.",
                                         show_default=False)] = ...,
    model: ModelOption = "smollm2",
    preset: Annotated[PresetName | None, typer.Option(help="lossless (every entry, ~1.2x "
                      "smaller), balanced (the default, ~21x) or small (~47x): how much is kept and how finely.",
                      show_default=False)] = None,
    ratio: Annotated[float | None, typer.Option(help="Fraction of entries kept, 0 < R <= 1.",
                                                show_default=False)] = None,
    scorer: Annotated[ScorerName | None, typer.Option(help="How entries are rated, with no "
                      "question known.", show_default=False)] = None,
    allocation: Annotated[AllocationName | None, typer.Option(help="How kept entries are "
                          "spread over layers and heads.", show_default=False)] = None,
    bits: Annotated[int | None, typer.Option(help="16 or 32: floats; 8, 4, 3 or 2: quantized.",
                                             show_default=False)] = None,
    codec: Annotated[CodecName | None, typer.Option(help="ans (entropy coding), zstd or raw.",
                                              show_default=False)] = None,
    key_bits: Annotated[int | None, typer.Option(help="Quantized keys' own bits.", show_default=False)] = None,
    group: Annotated[int | None, typer.Option(help="Quantized values: channels per step.", show_default=False)] = None,
    pre_rope: Annotated[bool | None, typer.Option("--pre-rope/--no-pre-rope", help="Store quantized keys without "
                        "RoPE.", show_default=False)] = None,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="Refit kept values to stand for dropped "
                                        "ones.")] = True,
    logit_bias: Annotated[bool | None, typer.Option("--logit-bias/--no-logit-bias", help="With the refit, a bias "
                          "per kept entry.", show_default=False)] = None,
    chunk_size: Annotated[int, typer.Option(help="Tokens prefilled at a time (bounds memory).")] = 512,
    target_top1: Annotated[float | None, typer.Option(help="Instead of a preset: the smallest file whose "
                           "self-check top1 is at least this.", show_default=False)] = None,
    target_kld: Annotated[float | None, typer.Option(help="Likewise for kld (nats per token).",
                                                     show_default=False)] = None,
    budget: Annotated[float | None, typer.Option(help="A target's search time, in prefills (default 4).",
                                                 show_default=False)] = None,
    estimate: Annotated[bool, typer.Option("--estimate/--no-estimate", help="Measure what the file lost and "
                                           "record it.")] = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (equal files need equal threads).",
                                                show_default=False)] = None,
    list_file: Annotated[Path | None, typer.Option("--list", help="Corpus: a file naming documents, one per line.",
                                                   show_default=False)] = None,
    engine: Annotated[EngineName, typer.Option(help="Corpus: local, or ray (a Ray Data "
                                        "job).")] = EngineName.local,
    address: Annotated[str | None, typer.Option(help="--engine ray: the cluster to join.",
                                                show_default=False)] = None,
    actors: Annotated[int | None, typer.Option(min=1, help="--engine ray: model-holding actors.",
                                               show_default=False)] = None,
    json_output: JsonOption = False,
):
    """Prefill DOCUMENT once through the model and store its KV cache, compressed, in a .kvc file.

    `kvc load FILE --prompt "..."` then answers from the file without re-reading the document. Every option and
    its measured effect: docs/cli.md.
    """
    from ..corpus.inputs import is_corpus

    engine = value(engine)
    wants_target = target_top1 is not None or target_kld is not None
    settings = Settings.from_options(
        preset=value(preset), codec=value(codec), ratio=ratio, scorer=value(scorer), allocation=value(allocation),
        bits=bits,
        quant=QuantOptions(key_bits=key_bits, value_group=group, pre_rope=pre_rope), chunk_size=chunk_size,
        target=Target(target_top1, target_kld) if wants_target else None, budget=budget, refit=refit,
        logit_bias=logit_bias, estimate=estimate)
    if not documents and list_file is None:
        raise UsageError("give a DOCUMENT (or several, a folder, a glob) or --list FILE")
    if is_corpus(documents or [], output, list_file):
        _corpus(documents or [], list_file, output, model, settings, device, dtype, engine, address, actors, threads,
                json_output)
        return
    if engine != "local" or address is not None or actors is not None:
        raise UsageError("--engine, --address and --actors apply to a corpus: give -o a folder")
    from ..document import read_document
    from ..paths import check_output

    (document,) = documents
    check_output(output)
    text = read_document(document)  # an empty, binary or missing document fails here, before torch loads
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from ..compress.pipeline import compress_text

    result = compress_text(text, output, model=model, settings=settings, device=device, dtype=dtype,
                           progress=not json_output, source=document)
    calibration = result.calibration
    if calibration is not None and not calibration["met"]:
        typer.echo(f"warning: no setting met the target {calibration['target']}; wrote the "
                   f"{chosen_text(calibration)} file, whose self-check gives "
                   f"{self_check_text(calibration['self_check'])}", err=True)
    if json_output:
        emit_json(result.as_json())
        return
    name = "stdin" if document == "-" else document
    typer.echo(f"compressed {name} -> {result.output}")
    typer.echo(f"  tokens       {result.tokens:,} ({result.model})")
    typer.echo(f"  raw KV       {mb(result.raw_bytes)} (fp16)")
    if result.scorer:
        typer.echo(f"  kept         {result.kept_ratio:.1%} of entries ({result.scorer} scores, "
                   f"{result.allocation} allocation, scored in {result.score_seconds:.1f} s)")
    precision = f"{result.bits}-bit" if result.key_bits in (None, result.bits) else (
        f"{result.key_bits}-bit keys, {result.bits}-bit values")
    typer.echo(f"  file         {mb(result.file_bytes)} ({precision}, {result.codec}, "
               f"{result.bits_per_element:.2f} bits per kept element), compression {result.compression:.2f}x")
    if estimate or calibration is not None:
        typer.echo(f"  loss         {estimate_text(result.estimate)}")
    typer.echo(f"  time         {result.seconds:.1f} s (prefill {result.prefill_seconds:.1f} s)")
    if calibration is not None:
        typer.echo(f"  calibrated   {calibration_text(calibration)}")


def _corpus(documents: list[str], list_file: Path | None, output: Path, model: str, settings: Settings, device: str,
            dtype: str, engine: str, address: str | None, actors: int | None, threads: int | None,
            json_output: bool) -> None:
    from ..corpus.inputs import expand, is_uri

    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output} is a file: a corpus is written into a folder")
    if engine == "local" and (address is not None or actors is not None):
        raise UsageError("--address and --actors are for --engine ray")
    sources = expand(documents, list_file, output)
    if engine == "local" and any(is_uri(s) for s in sources):
        raise UsageError("object storage (a URI) is read by --engine ray only")
    if engine == "ray":
        from ..corpus.on_ray import run_ray as run_engine
    else:
        from ..corpus.local import run_local as run_engine
    try:
        result = run_engine(sources, output, model, settings, device=device, dtype=dtype, threads=threads,
                            progress=not json_output,
                            **({"address": address, "actors": actors} if engine == "ray" else {}))
    except KeyboardInterrupt:
        fail(f"interrupted; {output / 'manifest.jsonl'} lists the documents finished (no partial .kvc file)", 130)
    if json_output:
        emit_json(result)
    else:
        rate = f", {result['tokens_per_second']:,.0f} tokens/s" if result["ok"] else ""
        typer.echo(f"compressed {result['documents']} documents into {output}: {result['ok']} ok, "
                   f"{result['skipped']} skipped (done before), {result['errors']} failed, in "
                   f"{result['seconds']:.1f} s{rate}")
        typer.echo(f"  manifest     {result['manifest']}")
    if result["errors"]:
        fail(f"{result['errors']} of {result['documents']} documents failed: their errors are in "
             f"{result['manifest']}")
