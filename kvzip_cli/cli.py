"""The `kvc` command line: one function per command; errors become one `error: ...` line and exit code 1."""

import functools
import json
import os
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kvc_format import ExportError, KvcFormatError, KvcReader, quantized

from . import __version__
from .errors import KvcError, UsageError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # reflows the docstrings' paragraphs to the terminal width
)


class Codec(str, Enum):
    raw = "raw"
    zstd = "zstd"
    ans = "ans"


class PresetName(str, Enum):
    lossless = "lossless"
    balanced = "balanced"
    small = "small"


class ScorerName(str, Enum):
    kvzip = "kvzip"
    kvzip_plus = "kvzip-plus"
    compactor = "compactor"
    knorm = "knorm"
    streaming = "streaming"
    random = "random"


class Decoder(str, Enum):
    auto = "auto"
    numpy = "numpy"
    triton = "triton"


class Allocation(str, Enum):
    global_ = "global"
    layer = "layer"
    head = "head"
    position = "position"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class Refit(str, Enum):
    on = "on"
    values = "values"
    off = "off"
    both = "both"
    all = "all"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kvc {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print kvc's version and exit.")] = False):
    """Compress a long document into a small, reusable KV cache (.kvc) and answer questions from it.

    Exit codes: 0 success; 1 bad input or a failure (a missing or corrupt file, the wrong model, an unreadable
    document), with one `error: ...` line on stderr; 2 a usage error (an unknown option, or an option value out of
    range or in conflict with another), whatever the files.
    """


def _fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def cli_errors(command):
    """Turn every failure into one line on stderr, never a traceback (KVC_DEBUG=1 shows one)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UsageError as exc:
            _fail(str(exc), 2)
        except KvcError as exc:
            _fail(str(exc))
        except KvcFormatError as exc:
            _fail(f"invalid .kvc file: {exc}")
        except ExportError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except MemoryError:
            _fail("out of memory; try a smaller --chunk-size or a shorter document")
        except BrokenPipeError:  # the reader of stdout went away (`kvc inspect f.kvc | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except OSError as exc:
            _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        except Exception as exc:
            if os.environ.get("KVC_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (run with KVC_DEBUG=1 for a traceback)")

    return wrapper


def _emit_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _open(path: Path) -> KvcReader:
    if not path.exists():
        raise KvcError(f"{path} does not exist")
    if path.is_dir():
        raise KvcError(f"{path} is a directory, not a .kvc file")
    return KvcReader(path)


ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Alias (smollm2 = embedded SmolLM2-135M-Instruct and gemma3 = Gemma 3 270M, both packaged, no network; "
        "qwen2, qwen3, llama, ...), hub id, "
        "local model folder, or .gguf file, of a tested family: Llama, Qwen2, Qwen3, Mistral, Gemma 2 and 3, "
        "Phi-3, GPT-NeoX, OLMo 2, Granite (`kvc models` lists them).",
    ),
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]


@app.command()
@cli_errors
def compress(
    documents: Annotated[list[str] | None, typer.Argument(
        help="UTF-8 text file to compress, or - to read stdin. Several files, a folder (its files, recursively) "
             "or a quoted glob compress a corpus into the folder -o, as does one file with -o an existing folder.",
        show_default=False, metavar="DOCUMENT...")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The .kvc file to write (atomically); for a corpus, "
                                         "the folder for its .kvc files and manifest.jsonl (made if missing).")] = ...,
    model: ModelOption = "smollm2",
    preset: Annotated[PresetName | None, typer.Option(
        help="lossless: every entry, 16-bit floats, zstd (~1.2x smaller; bit-exact for a model computing in 16 "
             "bits, float16 rounding of a CPU's float32 KV, where --bits 32 is bit-exact); balanced: 25% of "
             "entries (KVzip), values refit with a logit bias, 3-bit, entropy-coded (~21x); small: 12% of "
             "entries, values refit, 3-bit keys, 2-bit values (~47x). --ratio, --scorer, --bits, --codec, "
             "--logit-bias override it. (default: balanced)")] = None,
    ratio: Annotated[float | None, typer.Option(help="Fraction of context KV entries kept, 0 < R <= 1. Below 1, "
                                              "--scorer decides which entries stay, without knowing any "
                                              "question. (default: from --preset)")] = None,
    scorer: Annotated[ScorerName | None, typer.Option(help="kvzip: attention while the model repeats the document "
                                                      "(best, costs ~2 prefills); kvzip-plus: the same attention "
                                                      "weighted by what each value writes (KVzip+); compactor: key "
                                                      "leverage + local "
                                                      "attention (~1 prefill); knorm, streaming, random: cheap "
                                                      "baselines. (default: from --preset)")] = None,
    allocation: Annotated[Allocation | None, typer.Option(help="How the kept entries are spread: global (one "
                                                          "threshold over all layers and heads), layer or head "
                                                          "(equal shares), position (one set of positions shared "
                                                          "by every layer and head, the only pruned layout "
                                                          "llama.cpp can hold). Default: the scorer's own (global "
                                                          "for kvzip and compactor, head for the baselines).")] = None,
    bits: Annotated[int | None, typer.Option(help="16 (float16, or bfloat16 as computed) or 32 (float32, "
                                             "bit-exact) store floats; 8, 4, 3, 2 quantize: keys per channel "
                                             "(RoPE removed), values per token. (default: from --preset)")] = None,
    codec: Annotated[Codec | None, typer.Option(help="ans: rANS entropy coding of quantized symbols (smallest); "
                                                "zstd: byte-planes + zstd; raw: bytes as they are. (default: "
                                                "from --preset)")] = None,
    key_bits: Annotated[int | None, typer.Option(help="Quantized keys: their own precision, 8, 4, 3 or 2 (keys "
                                                 "carry most of the error). (default: --bits)")] = None,
    group: Annotated[int | None, typer.Option(help="Quantized values: channels sharing one quantization step "
                                              "(must divide the head size). (default: the whole head)")] = None,
    pre_rope: Annotated[bool | None, typer.Option("--pre-rope/--no-pre-rope", help="Quantized keys: store them "
                                                  "with RoPE removed (quantizes better) and re-apply it at load. "
                                                  "(default: when the model's RoPE allows)")] = None,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="Pruned caches: refit the kept values (least "
                                        "squares; about 20 s more for 4k tokens on 2 CPU cores) so attention "
                                        "over them gives what the full context gives to the model's queries "
                                        "while it repeats the document; lowers kld about 4x at 30% kept. Not "
                                        "with --target-top1/--target-kld.")] = True,
    logit_bias: Annotated[bool | None, typer.Option("--logit-bias/--no-logit-bias", help="Pruned caches, with the "
                                                    "refit: also fit a logit bias per kept entry, so the kept "
                                                    "entries carry the attention the dropped ones had (16-bit: kld "
                                                    "2-3x lower at 20-30% kept; 3-bit: 15-30%; about 2% of the "
                                                    "file). kvc and safetensors exports use it; llama.cpp and "
                                                    "MLX-LM cannot. (default: the preset's, on for balanced; off "
                                                    "with --allocation position)")] = None,
    chunk_size: Annotated[int, typer.Option(help="Prefill this many tokens at a time (bounds memory).")] = 512,
    target_top1: Annotated[float | None, typer.Option(help="Instead of a preset: search the ratio and bits for the "
                                                      "smallest file whose self-check top1 is at least this (e.g. "
                                                      "0.97). The self-check asks the model to repeat passages "
                                                      "of the document and what it says about them, and compares "
                                                      "its next-token choices with the full cache's.")] = None,
    target_kld: Annotated[float | None, typer.Option(help="Like --target-top1, for the self-check's KL divergence "
                                                     "from the full cache (nats per token, e.g. 0.01); with both, "
                                                     "both must hold.")] = None,
    budget: Annotated[float | None, typer.Option(help="Search time allowed for a target, in prefills of the "
                                                 "document, and at least 30 s. (default: 4)")] = None,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: auto (float32 on CPU, bfloat16 on CUDA), bfloat16, "
                                       "float16, float32.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads torch computes with. The value refit's "
                                                "least squares rounds differently with another count: equal "
                                                "files need equal threads. (default: torch's, the cores here; in "
                                                "a Ray actor on CPUs, the CPUs it holds, at least 1)")] = None,
    list_file: Annotated[Path | None, typer.Option("--list", help="Corpus: a file naming documents, one path per "
                                                   "line or JSON lines with a \"path\" key (relative paths from "
                                                   "the current folder).")] = None,
    engine: Annotated[Engine, typer.Option(help="Corpus: local (this process, one model) or ray (a Ray Data job: "
                                           "`pip install 'kvc[ray]'`).")] = Engine.local,
    address: Annotated[str | None, typer.Option(help="--engine ray: the Ray cluster to join (as ray.init's "
                                                "address, e.g. auto); default: a local one for this run.")] = None,
    actors: Annotated[int | None, typer.Option(min=1, help="--engine ray: model-holding actors (default: one per "
                                               "GPU in the cluster; without GPUs, 2).")] = None,
    json_output: JsonOption = False,
):
    """Prefill DOCUMENT once through the model and store its KV cache in a .kvc file.

    The document is placed in the model's chat template as a reusable prefix; `kvc load --prompt` later appends
    a question to it without re-reading the document. By default (--preset balanced) 25% of the entries are kept,
    refit, quantized to 3 bits and entropy-coded: about 21x smaller than the float16 cache.

    With --target-top1 or --target-kld, kvc scores the document once and searches for the smallest file whose
    self-check meets the target (within --budget prefills of extra time); the file records the target, the
    chosen settings and the self-check figures (`kvc inspect` shows them).

    On a corpus (several documents, a folder, a glob, --list, or -o an existing folder) the model loads once and
    each document gets its own .kvc in the folder -o, named by its content and the settings, and a row in
    manifest.jsonl there; a document already done is skipped (its file verified), one that fails is recorded
    and the others go on. Exit code 1 when any document failed. --engine ray runs it as a Ray Data job.
    """
    from .cache_file import QuantOptions
    from .calibrate import Target
    from .compress import compress as run_compress
    from .corpus_inputs import is_corpus

    wants_target = target_top1 is not None or target_kld is not None
    options = dict(
        model=model,
        preset=preset.value if preset else None,
        codec=codec.value if codec else None,
        ratio=ratio,
        scorer=scorer.value if scorer else None,
        allocation=allocation.value if allocation else None,
        bits=bits,
        quant=QuantOptions(key_bits=key_bits, value_group=group, pre_rope=pre_rope),
        chunk_size=chunk_size,
        device=device,
        dtype=dtype,
        target=Target(target_top1, target_kld) if wants_target else None,
        budget=budget,
        refit=refit,
        logit_bias=logit_bias,
    )
    if not documents and list_file is None:
        raise UsageError("give a DOCUMENT (or several, a folder, a glob) or --list FILE")
    if is_corpus(documents or [], output, list_file):
        _compress_corpus(documents or [], list_file, output, options, engine, address, actors, threads, json_output)
        return
    if engine is not Engine.local or address is not None or actors is not None:
        raise UsageError("--engine, --address and --actors apply to a corpus: give -o a folder")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    (document,) = documents
    result = run_compress(document, output, progress=not json_output, **options)
    calibration = result.calibration
    if calibration is not None and not calibration["met"]:
        typer.echo(f"warning: no setting met the target {calibration['target']}; wrote the {_chosen(calibration)} "
                   f"file, whose self-check gives {_figures(calibration)}", err=True)
    if json_output:
        _emit_json(result.as_json())
        return
    name = "stdin" if document == "-" else document
    typer.echo(f"compressed {name} -> {result.output}")
    typer.echo(f"  tokens       {result.tokens:,} ({result.model})")
    typer.echo(f"  raw KV       {_mb(result.raw_bytes)} (fp16)")
    if result.scorer:
        typer.echo(f"  kept         {result.kept_ratio:.1%} of entries ({result.scorer} scores, "
                   f"{result.allocation} allocation, scored in {result.score_seconds:.1f} s)")
    precision = f"{result.bits}-bit" if result.key_bits in (None, result.bits) else (
        f"{result.key_bits}-bit keys, {result.bits}-bit values")
    typer.echo(f"  file         {_mb(result.file_bytes)} ({precision}, {result.codec}, "
               f"{result.bits_per_element:.2f} bits per kept element), compression {result.compression:.2f}x")
    typer.echo(f"  time         {result.seconds:.1f} s (prefill {result.prefill_seconds:.1f} s)")
    if calibration is not None:
        typer.echo(f"  calibrated   {_calibration_line(calibration)}")


def _compress_corpus(documents: list[str], list_file: Path | None, output: Path, options: dict, engine: "Engine",
                     address: str | None, actors: int | None, threads: int | None, json_output: bool) -> None:
    from .compress import check_options
    from .corpus_inputs import expand, is_uri

    recorded = check_options(**options)
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output} is a file: a corpus is written into a folder")
    if engine is Engine.local and (address is not None or actors is not None):
        raise UsageError("--address and --actors are for --engine ray")
    sources = expand(documents, list_file, output)
    if engine is Engine.local and any(is_uri(s) for s in sources):
        raise UsageError("object storage (a URI) is read by --engine ray only")
    if engine is Engine.ray:
        from .corpus_ray import run_ray as run_engine
    else:
        from .corpus import run_local as run_engine
    try:
        result = run_engine(sources, output, options, recorded, threads=threads, progress=not json_output,
                            **({"address": address, "actors": actors} if engine is Engine.ray else {}))
    except KeyboardInterrupt:
        _fail(f"interrupted; {output / 'manifest.jsonl'} lists the documents finished (no partial .kvc file)", 130)
    if json_output:
        _emit_json(result)
    else:
        rate = f", {result['tokens_per_second']:,.0f} tokens/s" if result["ok"] else ""
        typer.echo(f"compressed {result['documents']} documents into {output}: {result['ok']} ok, "
                   f"{result['skipped']} skipped (done before), {result['errors']} failed, in "
                   f"{result['seconds']:.1f} s{rate}")
        typer.echo(f"  manifest     {result['manifest']}")
    if result["errors"]:
        _fail(f"{result['errors']} of {result['documents']} documents failed: their errors are in "
              f"{result['manifest']}")


def _chosen(calibration: dict) -> str:
    c = calibration["chosen"]
    bits = "16-bit" if c["bits"] == 16 else f"{c['key_bits']}-bit keys, {c['bits']}-bit values"
    return f"ratio {c['ratio']:g}, {bits}"


def _figures(calibration: dict) -> str:
    check = calibration["self_check"]
    return f"top1 {check['top1']:.3f}, kld {check['kld']:.4f} ({check['probes']} probes)"


def _calibration_line(calibration: dict) -> str:
    target = ", ".join(f"{'top1 >=' if k == 'top1' else 'kld <='} {v:g}" for k, v in calibration["target"].items())
    cost = calibration.get("search_prefills")
    cost = f", {cost:.1f} prefills" if cost is not None else ""
    budget = "; budget spent" if calibration.get("budget_exhausted") else ""
    return (f"target {target} {'met' if calibration['met'] else 'NOT met'}: self-check {_figures(calibration)} "
            f"at {_chosen(calibration)}; {calibration['trials']} trials in {calibration['search_seconds']:.1f} s"
            f"{cost}{budget}")


def _questions(prompts: list[str] | None, questions: Path | None) -> list[str]:
    """Every --prompt in order, then every line of --questions but blank ones and # comments."""
    asked = list(prompts or [])
    if any(not p.strip() for p in asked):
        raise UsageError("--prompt is empty: give a question")
    if questions is not None:
        from .document import read_document

        lines = (line.strip() for line in read_document(str(questions)).splitlines())
        asked += [line for line in lines if line and not line.startswith("#")]
        if not asked:
            raise KvcError(f"{questions} holds no question (one per line)")
    return asked


def _load_line(result: dict) -> str:
    """What was loaded and how long it took, against which prefill (measured here, or recorded at compress)."""
    kept = f" ({result['kept_ratio']:.0%} kept, {_mb(result['cache_bytes'])} in memory)"
    line = f"loaded {result['tokens']:,} tokens of KV{kept} in {result['load_seconds']:.2f} s"
    if result["prefill_here_seconds"] is not None:
        return (f"{line}; prefilling the document here took {result['prefill_here_seconds']:.2f} s: the cache was "
                f"ready {result['speedup']:.0f}x sooner")
    recorded = result["prefill_seconds"]
    if recorded is None:
        return line
    where = f" on {result['prefill_device']}" if result["prefill_device"] else ""
    return (f"{line} (the prefill took {recorded:.2f} s{where} when the file was made, maybe on another machine; "
            "--measure-prefill times it here)")


@app.command()
@cli_errors
def load(
    file: Annotated[Path, typer.Argument(help="The .kvc file.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model to load into (default: the one "
                                              "recorded in the file).")] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Question to answer from the cache; "
                                                     "repeat it to ask several, each from the same loaded cache "
                                                     "(reset between them).")] = None,
    questions: Annotated[Path | None, typer.Option(help="File of questions, one per line (# starts a comment "
                                                   "line), asked after any --prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Longest answer, in tokens; an answer cut "
                                                "there is marked (--json: \"stopped\": \"length\").")] = 64,
    measure_prefill: Annotated[bool, typer.Option("--measure-prefill", help="Also prefill the document here, to "
                                                  "compare the load with what answering without kvc costs on this "
                                                  "machine (otherwise the prefill time recorded when the file was "
                                                  "made is shown, from whatever machine made it).")] = False,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: auto (float32 on CPU, bfloat16 on CUDA), bfloat16, "
                                       "float16, float32.")] = "auto",
    decoder: Annotated[Decoder, typer.Option(help="Decoder of a quantized file's symbols: auto (triton for a model on "
                                         "a CUDA GPU when Triton is installed, else numpy), numpy (on the CPU), "
                                         "triton (GPU kernels).")] = Decoder.auto,
    json_output: JsonOption = False,
):
    """Load a .kvc into its model and answer each --prompt greedily, without re-reading the document.

    Without a question it verifies the file against the model and times the load. With --json, `answers` lists
    every question's answer in order; `answer`, `stopped` and `generate_seconds` are the first question's.
    """
    from .devices import resolve_device
    from .load import ask, choose_decoder
    from .load import load as run_load
    from .load import measure_prefill as run_prefill
    from .models import load_model
    from .progress import progress_bars

    asked = _questions(prompt, questions)
    with _open(file) as reader:
        header = reader.header
    chosen = choose_decoder(decoder.value, resolve_device(device))  # refuse before the model loads
    model_name = model or header["model"].get("name") or "smollm2"
    t0 = time.perf_counter()
    lm = load_model(model_name, device=device, dtype=dtype)
    entropy_coded = chosen == "numpy" and header.get("settings", {}).get("codec") == "ans"
    # start-up, like the model's: load_seconds times the file alone
    rans_decoder = quantized.warm_up() if entropy_coded else None
    model_seconds = time.perf_counter() - t0
    with progress_bars(not json_output) as task:
        kv = run_load(file, lm, task=task, decoder=decoder.value)
        prefill_here = (run_prefill(lm.model, kv, header.get("settings", {}).get("chunk_size") or 512, task)
                        if measure_prefill else None)
    timings = header.get("timings", {})
    result = {
        "file": str(file),
        "model": model_name,
        "tokens": kv.input_ids.shape[1],
        "kept_ratio": header.get("settings", {}).get("kept_ratio", 1.0),
        "cache_bytes": kv.cache_bytes(),
        "load_seconds": kv.load_seconds,
        "decoder": kv.decoder,
        "rans_decoder": rans_decoder,
        "prefill_seconds": timings.get("prefill_seconds"),
        "prefill_device": timings.get("device"),
        "prefill_here_seconds": prefill_here,
        "speedup": prefill_here / kv.load_seconds if prefill_here is not None else None,
        "model_load_seconds": model_seconds,
        "answer": None,
        "stopped": None,
        "generate_seconds": None,
        "answers": [],
    }
    for question in asked:
        answer = ask(lm.model, lm.tokenizer, kv, question, max_new_tokens)
        result["answers"].append({"question": question, "answer": answer.text, "stopped": answer.stopped,
                                  "answer_tokens": len(answer.token_ids), "generate_seconds": answer.seconds})
        if not json_output:
            _print_answer(question, answer, max_new_tokens, several=len(asked) > 1)
    if asked:
        first = result["answers"][0]
        result.update(answer=first["answer"], stopped=first["stopped"], generate_seconds=first["generate_seconds"],
                      answer_tokens=first["answer_tokens"])
    if json_output:
        _emit_json(result)
        return
    typer.echo(_load_line(result))
    if asked:
        seconds = sum(a["generate_seconds"] for a in result["answers"])
        typer.echo(f"answered {len(asked)} question{'s' if len(asked) > 1 else ''} in {seconds:.2f} s")


def _print_answer(question: str, answer, max_new_tokens: int, several: bool) -> None:
    if several:
        typer.echo(f"> {question}")
    typer.echo(answer.text)
    if answer.stopped == "length":
        typer.echo(f"[cut at --max-new-tokens {max_new_tokens}: the answer goes on]")
    typer.echo("")


def _summary(reader: KvcReader) -> dict:
    from .sizes import raw_fp16_bytes

    header = reader.header
    g = reader.geometry
    kept = reader.kept_per_layer()
    elements = 2 * sum(kept) * g.head_dim  # kept keys and values
    streams: dict[str, dict] = {}
    for section in reader.sections:
        for st in section.streams:
            entry = streams.setdefault(st.name, {"bytes": 0, "codecs": set()})
            entry["bytes"] += st.length
            entry["codecs"].add(st.codec)
    return {
        "file": reader.path,
        "version": f"{reader.version[0]}.{reader.version[1]}",
        "model": header["model"].get("name"),
        "fingerprint": header["model"],
        "tokens": g.tokens,
        "kept_ratio": sum(kept) / g.held_entries,  # of what the model's own (windowed) cache holds
        "file_bytes": reader.file_size,
        "raw_bytes": raw_fp16_bytes(g.held_entries, g.head_dim),
        "cache": header["cache"],
        "settings": header.get("settings", {}),
        "prompt": {k: v for k, v in header["prompt"].items() if k != "prefix_ids"},
        "timings": header.get("timings", {}),
        "calibration": header.get("calibration"),
        "writer": header.get("kvc", {}).get("writer"),
        "bits_per_element": 8 * reader.file_size / elements,
        "streams": {name: {"bytes": e["bytes"], "bits_per_element": 8 * e["bytes"] / elements,
                           "codecs": sorted(e["codecs"])} for name, e in streams.items()},
        "layers": [{"layer": i, "bytes": n, "kept_ratio": k / (g.kv_heads * g.held(i)), "window": window,
                    "positions": g.held(i)}
                   for i, (n, k, window) in enumerate(zip(reader.section_sizes(), kept, g.windows or [None] * g.layers,
                                                          strict=True))],
    }


def _preset_text(settings: dict, calibration) -> str:
    if isinstance(calibration, dict):
        return "none: the settings were searched for a fidelity target (calibrated, below)"
    if "preset" not in settings:
        return "not recorded (a file written before kvc recorded presets)"
    changed = settings.get("overrides") or []
    return settings["preset"] + (f", changed by {' '.join(changed)}" if changed else "")


def _settings_text(settings: dict, cache: dict) -> str:
    """The compression settings in words: what was kept, at what precision, with which codec."""
    if settings.get("scorer"):
        kept = (f"{settings['kept_ratio']:.1%} of entries kept (ratio {settings['ratio']:g}, {settings['scorer']} "
                f"scores, {settings['allocation']} allocation)")
        kept += {"values": ", values refit", "values+bias": ", values refit with a logit bias per entry"}.get(
            settings.get("refit"), "")
    else:
        kept = "every entry kept"
    bits = settings.get("bits")
    if bits in (16, 32):
        precision = f"{bits}-bit floats"
    else:
        rope = ", RoPE removed" if cache.get("key_rope") == "removed" else ""
        group = settings.get("value_group")
        precision = (f"keys {settings.get('key_bits') or bits}-bit{rope}, values {bits}-bit"
                     + (f" in groups of {group}" if group else ""))
    return f"{kept}; {precision}; codec {settings.get('codec')}; prefilled in chunks of {settings.get('chunk_size')}"


@app.command()
@cli_errors
def inspect(file: Annotated[Path, typer.Argument(help="The .kvc file.")], json_output: JsonOption = False):
    """Show a .kvc file's header: model fingerprint, settings, sizes per layer section."""
    with _open(file) as reader:
        info = _summary(reader)
    if json_output:
        _emit_json(info)
        return
    fp = info["fingerprint"]
    cache = info["cache"]
    typer.echo(f"{info['file']}  (.kvc {info['version']}, written by {info['writer']})")
    typer.echo(f"  model        {info['model']} ({fp.get('architecture')}, {fp.get('num_layers')} layers, "
               f"{fp.get('num_kv_heads')} KV heads x {fp.get('head_dim')})")
    typer.echo(f"  weights      sha256 {str(fp.get('weight_digest'))[:16]}...  tokenizer "
               f"{str(fp.get('tokenizer_digest'))[:16]}...")
    typer.echo(f"  tokens       {info['tokens']:,} ({info['prompt'].get('template')} template), "
               f"KV computed in {cache.get('computed_dtype')}, layout {cache['layout']}")
    sliding = [entry for entry in info["layers"] if entry["window"]]
    if sliding:
        widths = ", ".join(sorted({str(entry["window"]) for entry in sliding}))
        typer.echo(f"  windows      {len(sliding)} of {len(info['layers'])} layers slide (window {widths}): each "
                   f"stores only the {min(entry['positions'] for entry in sliding):,} positions a later token sees")
    typer.echo(f"  preset       {_preset_text(info['settings'], info['calibration'])}")
    typer.echo(f"  settings     {_settings_text(info['settings'], cache)}")
    typer.echo(f"  size         {_mb(info['file_bytes'])} for {_mb(info['raw_bytes'])} of fp16 KV in the model's cache "
               f"({info['raw_bytes'] / info['file_bytes']:.2f}x), {info['bits_per_element']:.2f} bits per kept "
               "element")
    typer.echo("  streams      " + ", ".join(f"{name} {e['bits_per_element']:.2f} ({'/'.join(e['codecs'])})"
                                             for name, e in info["streams"].items()))
    if info["timings"].get("prefill_seconds") is not None:
        typer.echo(f"  prefill      {info['timings']['prefill_seconds']:.2f} s on {info['timings'].get('device')}")
    if isinstance(info["calibration"], dict):
        typer.echo(f"  calibrated   {_calibration_line(info['calibration'])}")
    sizes = [entry["bytes"] for entry in info["layers"]]
    typer.echo(f"  sections     {len(sizes)} layers, {min(sizes):,}..{max(sizes):,} bytes each")
    kept = [entry["kept_ratio"] for entry in info["layers"]]
    typer.echo(f"  kept         {info['kept_ratio']:.1%} of entries; per layer {min(kept):.1%}..{max(kept):.1%}")
    if info["kept_ratio"] < 1:
        typer.echo("  per layer    " + " ".join(f"{k:.0%}" for k in kept))


@app.command()
@cli_errors
def verify(file: Annotated[Path, typer.Argument(help="The .kvc file.")], json_output: JsonOption = False):
    """Check a .kvc file's structure, every checksum, and that every stream decodes (no model needed)."""
    try:
        with _open(file) as reader:
            reader.verify()
            sections = reader.geometry.layers
    except (KvcError, KvcFormatError) as exc:
        message = str(exc) if isinstance(exc, KvcError) else f"invalid .kvc file: {exc}"
        if json_output:
            _emit_json({"ok": False, "file": str(file), "error": message})
        _fail(message)
    if json_output:
        _emit_json({"ok": True, "file": str(file), "sections": sections})
    else:
        typer.echo(f"{file}: ok ({sections} layer sections, all checksums match)")


def _numbers(text: str, kind: type, option: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, not {text!r}") from None
    if not values:
        raise UsageError(f"{option} is empty")
    return values


class ExportDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


class ExportTarget(str, Enum):
    safetensors = "safetensors"
    llama_cpp = "llama.cpp"
    mlx = "mlx"


class CacheType(str, Enum):
    f16 = "f16"
    q8_0 = "q8_0"


def _recorded_gguf(header: dict) -> Path | None:
    """The GGUF file the .kvc's model was converted from, when it is known here: a packaged model's, or a .gguf
    `--model` that still exists."""
    from .model_files import PACKAGED, packaged_gguf

    name = str(header["model"].get("name") or "")
    if name in PACKAGED:
        return packaged_gguf(name)
    return Path(name) if name.endswith(".gguf") and Path(name).is_file() else None


def _runtime_gguf(header: dict, gguf: Path | None) -> Path:
    """The GGUF model llama.cpp will load: --gguf, else the one the .kvc's model was converted from, if known."""
    gguf = gguf or _recorded_gguf(header)
    if gguf is None:
        name = header["model"].get("name") or "the model"
        raise KvcError(f"--to llama.cpp needs --gguf: the GGUF file of {name} that llama.cpp will load")
    return gguf


def _mlx_model(header: dict) -> str:
    """What MLX-LM should load for the .kvc's model: the embedded model's converted folder, else its recorded name."""
    from .model_files import converted_location, is_converted

    gguf = _recorded_gguf(header)
    if gguf is None:
        return str(header["model"].get("name") or "")
    folder = converted_location(gguf)
    if not is_converted(folder):  # the one case that needs transformers: converting the GGUF
        from .models import converted_folder

        folder = converted_folder(gguf)
    return str(folder)


@app.command()
@cli_errors
def export(
    file: Annotated[Path, typer.Argument(help="The .kvc file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The file to write (atomically).")],
    to: Annotated[ExportTarget, typer.Option(help="safetensors: per-head K/V and positions for any reader; "
                                             "llama.cpp: a sequence-state file for llama_state_seq_load_file "
                                             "(node-llama-cpp's loadStateFromFile); mlx: an MLX-LM prompt cache "
                                             "for load_prompt_cache.")] = ExportTarget.safetensors,
    dtype: Annotated[ExportDtype | None, typer.Option(help="safetensors and mlx: element type of the keys and "
                                                      "values. (default: float32 for safetensors, float16 for mlx, "
                                                      "what MLX models compute in)")] = None,
    gguf: Annotated[Path | None, typer.Option(help="llama.cpp: the GGUF model file the runtime loads; the .kvc is "
                                              "checked against it. (default: the embedded model's GGUF, for files "
                                              "made with it)")] = None,
    cache_type: Annotated[CacheType, typer.Option(help="llama.cpp: the runtime context's K/V cache type (f16 is "
                                                  "llama.cpp's default; q8_0 needs flash attention).")] = CacheType.f16,
    flash_attn: Annotated[bool, typer.Option("--flash-attn/--no-flash-attn", help="llama.cpp: whether the runtime "
                                             "context uses flash attention (its default on the CPU); without it "
                                             "llama.cpp stores V transposed and refuses a file written for the "
                                             "other setting.")] = True,
    mlx_model: Annotated[str | None, typer.Option(help="mlx: the model folder or hub id MLX-LM loads, recorded in "
                                                  "the file (mlx_lm.generate refuses another). (default: the "
                                                  ".kvc's model; for the embedded model its converted folder)")] = None,
    json_output: JsonOption = False,
):
    """Write a .kvc cache for another runtime (no model needed; every checksum is verified on the way, and the file
    appears only once complete).

    **safetensors**: for every layer L and KV head H, `layers.L.heads.H.keys` and `.values` (kept entries x
    head_dim, dequantized, keys with RoPE applied as the model cached them) and `.positions` (int32); the metadata
    carries the .kvc header as JSON.

    **llama.cpp**: the sequence state llama.cpp itself saves, for the llama.cpp in node-llama-cpp 3.21.1 (state
    version 3). Dense files, and files pruned with `--allocation position` (llama.cpp keeps their gaps), export; a
    file pruned per head cannot.

    **mlx**: an MLX-LM prompt cache for `load_prompt_cache` (mlx-lm 0.32.2); dense files only, since MLX-LM's cache
    has no gaps.

    Ask questions with the .kvc's chat template around them: `--json` prints `question_prefix` and
    `question_suffix`.
    """
    from .paths import check_output
    from .progress import progress_bars

    check_output(output)
    with _open(file) as reader:
        layers, header = reader.geometry.layers, reader.header
    result = {"file": str(file), "output": str(output), "to": to.value}
    runtime_gguf = _runtime_gguf(header, gguf) if to is ExportTarget.llama_cpp else None
    started = time.perf_counter()
    with progress_bars(not json_output) as task:
        advance = task("export", layers)
        if to is ExportTarget.llama_cpp:
            from kvc_format.llama_cpp import export_llama_cpp

            info = export_llama_cpp(file, output, runtime_gguf, cache_type=cache_type.value,
                                    v_trans=not flash_attn, on_layer=lambda layer: advance(1))
            written = info.bytes
            result.update(runtime=info.runtime, state_version=info.state_version, cells=info.cells,
                          tokens=info.tokens, cache_type=info.cache_type, v_trans=info.v_trans)
        elif to is ExportTarget.mlx:
            from kvc_format import export_mlx

            element = (dtype or ExportDtype.float16).value
            written = export_mlx(file, output, dtype=element, model=mlx_model or _mlx_model(header))
            result.update(dtype=element, runtime="mlx-lm 0.32.2")
        else:
            from kvc_format import export_file

            element = (dtype or ExportDtype.float32).value
            written = export_file(file, output, element, on_layer=lambda layer: advance(1))
            result.update(dtype=element)
    prompt = header["prompt"]
    result.update(bytes=written, seconds=round(time.perf_counter() - started, 3),
                  question_prefix=prompt["question_prefix"], question_suffix=prompt["question_suffix"])
    if json_output:
        _emit_json(result)
    elif to is ExportTarget.llama_cpp:
        gaps = "" if result["cells"] == result["tokens"] else f" (gaps: {result['tokens']:,} tokens)"
        typer.echo(f"{output}: {_mb(written)}, {result['cells']:,} cells of {result['cache_type']} K/V{gaps}, "
                   f"v_trans {int(result['v_trans'])}, for {result['runtime']} ({result['seconds']:.1f} s)")
    elif to is ExportTarget.mlx:
        typer.echo(f"{output}: {_mb(written)} MLX-LM prompt cache of {result['dtype']} K/V for {layers} layers "
                   f"({result['seconds']:.1f} s)")
    else:
        typer.echo(f"{output}: {_mb(written)} of {result['dtype']} K/V and positions for {layers} layers "
                   f"({result['seconds']:.1f} s)")


@app.command()
@cli_errors
def bench(
    document: Annotated[Path, typer.Argument(help="UTF-8 text file to measure on.")],
    model: ModelOption = "smollm2",
    ratios: Annotated[str, typer.Option(help="Kept fractions for pruning settings and peers, comma-separated.")] = (
        "0.5,0.3,0.2,0.1"
    ),
    bits: Annotated[str, typer.Option(help="Bit widths for kvc settings, comma-separated: 16, 32 (floats), 8, 4, "
                                      "3, 2 (quantized; measured with the entropy coder and with zstd).")] = "16",
    presets: Annotated[str | None, typer.Option(help="Presets to measure, comma-separated (lossless, balanced, "
                                                "small); empty for none. (default: all three; with --lengths: "
                                                "balanced)")] = None,
    scorers: Annotated[str, typer.Option(help="kvc scorers to sweep at each ratio, comma-separated: kvzip, "
                                         "kvzip-plus, compactor, knorm, streaming, random; empty for none.")] = "kvzip",
    allocations: Annotated[str, typer.Option(help="Budget allocations to sweep for each scorer, comma-separated "
                                             "(global, layer, head); default: each scorer's own.")] = "",
    peers: Annotated[bool, typer.Option("--peers", help="Also measure NVIDIA kvpress presses (KVzip, Compactor, "
                                        "SnapKV, Knorm) at the same kept ratios.")] = False,
    refit: Annotated[Refit, typer.Option(help="Pruned kvc settings and presets: their kept values refit with a "
                                         "logit bias (on, as kvc compress does), refit without the bias (values, "
                                         "as --no-logit-bias), not refit (off), on and off side by side (both), "
                                         "or all three.")] = Refit.on,
    probes: Annotated[Path | None, typer.Option(help="File of extra probe questions, one per line.")] = None,
    new_tokens: Annotated[int, typer.Option(min=1, max=256, help="Length N of the reference answers.")] = 32,
    lengths: Annotated[str | None, typer.Option(help="Instead of fidelity: time to first token from a .kvc vs "
                                                "re-prefilling, at these document lengths in tokens (e.g. "
                                                "1k,2k,4k,8k; lengths past the model's context are skipped).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of kld and top1 against compression (with "
                                              "--lengths: of time to first token against length).")] = None,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype (auto: float32 on CPU, bfloat16 on CUDA).")] = "auto",
    json_output: JsonOption = False,
):
    """Measure fidelity (kld, top1, delta_nll, agreement@N, needle), size and speed against the full cache.

    Three key sentences are planted in the document (at 10%, 50% and 90%) for the needle test, and every setting
    is measured on that same text, with the same probes: built-in reconstruction, summary and topic questions,
    plus --probes. The full cache's greedy answers are the reference.
    """
    from .bench.peers import require_kvpress
    from .bench.probes import read_probes
    from .bench.report import plot as write_plot
    from .bench.report import print_table, require_matplotlib
    from .bench.runner import run_bench
    from .bench.sweep import REFITS, build_sweep
    from .document import read_document
    from .models import load_model
    from .progress import progress_bars

    if plot is not None:
        require_matplotlib()
        if not plot.parent.is_dir():
            raise KvcError(f"plot folder {plot.parent} does not exist")
    if lengths is not None:
        _bench_lengths(document, model, lengths, presets or "balanced", plot, device, dtype, json_output)
        return
    presets = "lossless,balanced,small" if presets is None else presets
    sweep = build_sweep(
        ratios=_numbers(ratios, float, "--ratios"),
        bits=_numbers(bits, int, "--bits"),
        scorers=tuple(s.strip() for s in scorers.split(",") if s.strip()),
        peers=peers,
        allocations=tuple(a.strip() for a in allocations.split(",") if a.strip()) or (None,),
        presets=tuple(p.strip() for p in presets.split(",") if p.strip()),
        refits=REFITS[Refit(refit).value],
    )
    if peers:
        require_kvpress()
    text = read_document(str(document))
    user_probes = read_probes(probes) if probes else []
    lm = load_model(model, device=device, dtype=dtype)
    with progress_bars(True) as task:
        result = run_bench(text, str(document), lm, sweep, user_probes, task, new_tokens).as_json()
    if plot is not None:
        write_plot([result], plot)
    _report(result, json_output, print_table, plot)


def _bench_lengths(document: Path, model: str, lengths: str, preset: str, plot: Path | None, device: str,
                   dtype: str, json_output: bool) -> None:
    from .bench.lengths import as_json, check_lengths, parse_lengths, run_lengths
    from .bench.lengths_report import plot_lengths, print_lengths
    from .document import read_document
    from .models import load_model
    from .presets import get_preset
    from .progress import progress_bars

    counts = parse_lengths(lengths)
    if "," in preset:
        raise UsageError("--lengths measures one preset: pass a single --presets value")
    get_preset(preset)
    text = read_document(str(document))
    lm = load_model(model, device=device, dtype=dtype)
    quantized.warm_up()  # the compiled decoder's one-time start-up stays out of the first length's load time
    check_lengths(lm, counts)
    with progress_bars(True) as task:
        rows, notes = run_lengths(text, lm, counts, preset, task=task)
    result = as_json(rows, notes, lm, preset, str(document))
    if plot is not None:
        plot_lengths(result, plot)
    _report(result, json_output, print_lengths, plot)


def _report(result: dict, json_output: bool, show, plot: Path | None) -> None:
    """A bench result as JSON on stdout, or shown as a table (and where its plot went)."""
    if json_output:
        _emit_json(result)
        return
    show(result)
    if plot is not None:
        typer.echo(f"plot written to {plot}")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _packaged_info(alias: str) -> dict:
    """A packaged model's state, without converting or assembling anything."""
    from .model_files import PACKAGED, converted_location, is_converted, packaged_gguf

    model = PACKAGED[alias]
    info = {"alias": alias, "model": model.title, "package": model.package, "terms": model.terms, "installed": False,
            "gguf": None, "converted": None, "error": None}
    try:
        gguf = packaged_gguf(alias, assemble=False)
    except KvcError as exc:
        return {**info, "error": str(exc)}
    folder = converted_location(gguf) if gguf is not None else None
    return {**info, "installed": True, "gguf": str(gguf) if gguf else None,
            "converted": str(folder) if folder is not None and is_converted(folder) else None}


def _models_info() -> dict:
    from huggingface_hub import try_to_load_from_cache

    from .families import TESTED_FAMILIES
    from .model_files import EMBEDDED, HUB_ALIASES, PACKAGED, cache_dir, converted_models

    packaged = [{**_packaged_info(alias), "default": alias == EMBEDDED} for alias in PACKAGED]
    aliases = [{"alias": alias, "hub_id": repo, "cached": isinstance(try_to_load_from_cache(repo, "config.json"), str)}
               for alias, repo in HUB_ALIASES.items()]
    converted = [{"folder": str(f), "bytes": _folder_bytes(f)} for f in converted_models()]
    return {"packaged": packaged, "aliases": aliases, "families": TESTED_FAMILIES, "cache_dir": str(cache_dir()),
            "converted": converted}


@app.command()
@cli_errors
def models(json_output: JsonOption = False):
    """List the model aliases (and whether each is in the local Hugging Face cache), the model families kvc is tested
    on, and the GGUF conversions kvc keeps in its cache folder (no model is loaded).

    `--model` also takes any hub id (org/name), a local model folder, or a .gguf file, of a tested family.
    """
    info = _models_info()
    if json_output:
        _emit_json(info)
        return
    for p in info["packaged"]:
        if p["error"]:
            state = p["error"]
        elif p["converted"]:
            state = "converted"
        else:
            state = "installed, not converted yet (the first use converts it, about a minute)"
        role = "default" if p["default"] else "packaged"
        typer.echo(f"{role:<9} {p['alias']:<14} {p['model']}; no network needed; terms: {p['terms']}: {state}")
    for a in info["aliases"]:
        where = "in the local Hugging Face cache" if a["cached"] else "downloaded on first use (needs network)"
        typer.echo(f"alias     {a['alias']:<14} {a['hub_id']}: {where}")
    typer.echo("families  tested with kvc (tests/test_families.py): " + ", ".join(info["families"]))
    typer.echo(f"converted {len(info['converted'])} GGUF model folder(s) in {info['cache_dir']}/models"
               + "".join(f"\n          {c['folder']} ({_mb(c['bytes'])})" for c in info["converted"]))


@app.command()
def version():
    """Print kvc's version."""
    typer.echo(f"kvc {__version__}")


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="kvc")


if __name__ == "__main__":
    sys.exit(main())
