"""A `.kvc` file → another runtime's cache file (no model, no torch but where a GGUF must first be converted):
safetensors, llama.cpp's sequence state, or an MLX-LM prompt cache. `export` returns what was written."""

import time
from collections.abc import Callable
from pathlib import Path

from kvc_format import KvcReader

from .errors import KvcError
from .paths import check_output

TARGETS = ("safetensors", "llama.cpp", "mlx")
DTYPES = ("float32", "float16")
CACHE_TYPES = ("f16", "q8_0")


def recorded_gguf(header: dict) -> Path | None:
    """The GGUF file the .kvc's model was converted from, when it is known here: a packaged model's, or a .gguf
    `--model` that still exists."""
    from .models.files import PACKAGED, packaged_gguf

    name = str(header["model"].get("name") or "")
    if name in PACKAGED:
        return packaged_gguf(name)
    return Path(name) if name.endswith(".gguf") and Path(name).is_file() else None


def runtime_gguf(header: dict, gguf: Path | None) -> Path:
    """The GGUF model llama.cpp will load: `gguf`, else the one the .kvc's model was converted from, if known."""
    gguf = gguf or recorded_gguf(header)
    if gguf is None:
        name = header["model"].get("name") or "the model"
        raise KvcError(f"--to llama.cpp needs --gguf: the GGUF file of {name} that llama.cpp will load")
    return gguf


def mlx_model(header: dict) -> str:
    """What MLX-LM should load for the .kvc's model: a packaged model's converted folder, else its recorded name."""
    from .models.files import converted_location, is_converted

    gguf = recorded_gguf(header)
    if gguf is None:
        return str(header["model"].get("name") or "")
    folder = converted_location(gguf)
    if not is_converted(folder):  # the one case that needs transformers: converting the GGUF
        from .models.loading import converted_folder

        folder = converted_folder(gguf)
    return str(folder)


def export(file: Path, output: Path, to: str = "safetensors", *, dtype: str | None = None, gguf: Path | None = None,
           cache_type: str = "f16", flash_attn: bool = True, model: str | None = None,
           on_layer: Callable[[int], None] = lambda layer: None) -> dict:
    """Write `file` for runtime `to` at `output` (atomically; every checksum verified on the way). `dtype`:
    safetensors' and mlx's element type (default float32 and float16); `gguf`, `cache_type`, `flash_attn`:
    llama.cpp's model file and context settings; `model`: the folder or hub id MLX-LM loads. Returns what was
    written, with the question template the runtime must put around a question."""
    if to not in TARGETS:
        raise KvcError(f"unknown export target {to!r}: use one of {', '.join(TARGETS)}")
    check_output(output)
    with KvcReader(file) as reader:
        header = reader.header
    result = {"file": str(file), "output": str(output), "to": to}
    started = time.perf_counter()
    if to == "llama.cpp":
        from kvc_format.llama_cpp import export_llama_cpp

        info = export_llama_cpp(file, output, runtime_gguf(header, gguf), cache_type=cache_type,
                                v_trans=not flash_attn, on_layer=on_layer)
        written = info.bytes
        result.update(runtime=info.runtime, state_version=info.state_version, cells=info.cells, tokens=info.tokens,
                      cache_type=info.cache_type, v_trans=info.v_trans)
    elif to == "mlx":
        from kvc_format import export_mlx

        element = dtype or "float16"
        written = export_mlx(file, output, dtype=element, model=model or mlx_model(header))
        result.update(dtype=element, runtime="mlx-lm 0.32.2")
    else:
        from kvc_format import export_file

        element = dtype or "float32"
        written = export_file(file, output, element, on_layer=on_layer)
        result.update(dtype=element)
    prompt = header["prompt"]
    result.update(bytes=written, seconds=round(time.perf_counter() - started, 3),
                  question_prefix=prompt["question_prefix"], question_suffix=prompt["question_suffix"])
    return result
