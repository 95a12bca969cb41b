"""`kvc load`: parse, check the file (before torch is imported), load it into the model, answer, render."""

import importlib.util
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ..compress.settings import DEFAULT_CHUNK
from ..errors import KvcError, UsageError
from ..load import DECODERS
from .common import DeviceOption, DtypeOption, JsonOption, choice, cli_errors, emit_json, open_reader, value

DecoderName = choice("DecoderName", DECODERS)
NUMPY_DECODER_NOTE = ("note: numba is not installed, so this entropy-coded file decodes with numpy, 2-3x slower: "
                      "pip install numba")


def numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _questions(prompts: list[str] | None, questions: Path | None) -> list[str]:
    """Every --prompt in order, then every line of --questions but blank ones and # comments."""
    asked = list(prompts or [])
    if any(not p.strip() for p in asked):
        raise UsageError("--prompt is empty: give a question")
    if questions is not None:
        from ..document import read_document

        lines = (line.strip() for line in read_document(str(questions)).splitlines())
        asked += [line for line in lines if line and not line.startswith("#")]
        if not asked:
            raise KvcError(f"{questions} holds no question (one per line)")
    return asked


class _Stream:
    """An answer written to the terminal as it is decoded (its first piece without leading spaces)."""

    def __init__(self):
        self.started = False

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        sys.stdout.write(text)
        sys.stdout.flush()


@cli_errors
def load(
    file: Annotated[Path, typer.Argument(help="The .kvc file.", show_default=False, metavar="FILE")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model to load into (default: the file's).",
                                              show_default=False)] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A question; repeat to ask several.",
                                                     show_default=False)] = None,
    questions: Annotated[Path | None, typer.Option(help="A file of questions, one per line.",
                                                   show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Longest answer, in tokens.")] = 64,
    measure_prefill: Annotated[bool, typer.Option("--measure-prefill", help="Also prefill the document here, to "
                                                  "compare.")] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    decoder: Annotated[DecoderName, typer.Option(help="Symbol decoder: auto, numpy (CPU) or "
                                         "triton (GPU).")] = DecoderName.auto,
    json_output: JsonOption = False,
):
    """Load a .kvc into its model and answer each --prompt, without re-reading the document.

    Without a question it checks the file against the model and times the load. Answers stream to a terminal.
    Details: docs/cli.md.
    """
    asked = _questions(prompt, questions)
    decoder = value(decoder)
    with open_reader(file) as reader:
        header = reader.header
    from kvc_format import quantized

    from ..devices import resolve_device
    from ..load.answer import ask
    from ..load.loader import choose_decoder
    from ..load.loader import load as load_file
    from ..load.loader import measure_prefill as run_prefill
    from ..load.report import LoadReport
    from ..models.files import EMBEDDED
    from ..models.loading import load_model
    from ..progress import progress_bars

    chosen = choose_decoder(decoder, resolve_device(device))  # refuse before the model loads
    model_name = model or header["model"].get("name") or EMBEDDED
    t0 = time.perf_counter()
    lm = load_model(model_name, device=device, dtype=dtype)
    entropy_coded = chosen == "numpy" and header.get("settings", {}).get("codec") == "ans"
    # start-up, like the model's: load_seconds times the file alone
    rans_decoder = quantized.warm_up() if entropy_coded else None
    if rans_decoder == "numpy" and not json_output and not numba_installed():  # said once per load
        typer.echo(NUMPY_DECODER_NOTE, err=True)
    model_seconds = time.perf_counter() - t0
    with progress_bars(not json_output) as task:
        kv = load_file(file, lm, task=task, decoder=decoder)
        prefill_here = (run_prefill(lm.model, kv, header.get("settings", {}).get("chunk_size") or DEFAULT_CHUNK,
                                    task)
                        if measure_prefill else None)
    timings = header.get("timings", {})
    result = LoadReport(file=str(file), model=model_name, tokens=kv.input_ids.shape[1],
                        kept_ratio=header.get("settings", {}).get("kept_ratio", 1.0), cache_bytes=kv.cache_bytes(),
                        load_seconds=kv.load_seconds, decoder=kv.decoder, rans_decoder=rans_decoder,
                        prefill_seconds=timings.get("prefill_seconds"), prefill_device=timings.get("device"),
                        prefill_here_seconds=prefill_here, model_load_seconds=model_seconds,
                        document=header.get("document", {}).get("name"), estimate=header.get("estimate"))
    streaming = not json_output and stdout_is_terminal()
    for question in asked:
        if not json_output and len(asked) > 1:
            typer.echo(f"> {question}")
        answer = ask(lm.model, lm.tokenizer, kv, question, max_new_tokens, on_text=_Stream() if streaming else None)
        result.add(question, answer)
        if not json_output:
            typer.echo("" if streaming else answer.text)
            if answer.stopped == "length":
                typer.echo(f"[cut at --max-new-tokens {max_new_tokens}: the answer goes on]")
            typer.echo("")
    if json_output:
        emit_json(result.as_json())
        return
    for line in result.lines():
        typer.echo(line)
