"""`python -m kvc_format`: check, describe or export a `.kvc` file without torch (for edge devices).

    python -m kvc_format verify doc.kvc
    python -m kvc_format info doc.kvc
    python -m kvc_format export doc.kvc doc.safetensors [--dtype float16]
    python -m kvc_format export doc.kvc doc.state --to llama.cpp --gguf model.gguf [--no-flash-attn] [--cache-type q8_0]
    python -m kvc_format export doc.kvc doc.safetensors --to mlx [--model-folder FOLDER]
"""

import argparse
import dataclasses
import json
import sys

from .errors import ExportError, KvcFormatError
from .export import EXPORT_DTYPES, export_file
from .llama_cpp import CACHE_TYPES, export_llama_cpp
from .mlx_cache import export_mlx
from .reader import KvcReader

TARGETS = ("safetensors", "llama.cpp", "mlx")


def _verify(args) -> str:
    with KvcReader(args.file) as reader:
        reader.verify()
        return f"ok: {args.file} (format {reader.version[0]}.{reader.version[1]}, {reader.file_size} bytes)"


def _info(args) -> str:
    with KvcReader(args.file) as reader:
        g = reader.geometry
        geometry = dataclasses.asdict(g)
        if g.windows is not None:  # what each layer stores: its window may leave it only the last positions
            geometry["held"] = [g.held(layer) for layer in range(g.layers)]
        return json.dumps({"format": list(reader.version), "bytes": reader.file_size, "cache": geometry,
                           "model": reader.header["model"], "settings": reader.header.get("settings")}, indent=2)


def _export(args) -> str:
    if args.to == "llama.cpp":
        if args.gguf is None:
            raise ExportError("--to llama.cpp needs --gguf: the GGUF model file the runtime will load")
        info = export_llama_cpp(args.file, args.output, args.gguf, cache_type=args.cache_type,
                                v_trans=not args.flash_attn)
        return (f"wrote {args.output} ({info.bytes} bytes: {info.cells} of {info.tokens} token cells, "
                f"{info.cache_type}, v_trans {int(info.v_trans)}) for {info.runtime}")
    if args.to == "mlx":
        written = export_mlx(args.file, args.output, dtype=args.dtype or "float16", model=args.mlx_model)
        return f"wrote {args.output} ({written} bytes, an MLX-LM prompt cache)"
    written = export_file(args.file, args.output, args.dtype or "float32")
    return f"wrote {args.output} ({written} bytes)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvc_format", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every checksum and decode every layer")
    verify.add_argument("file")
    verify.set_defaults(run=_verify)
    info = commands.add_parser("info", help="print the cache geometry, model and settings as JSON")
    info.add_argument("file")
    info.set_defaults(run=_info)
    export = commands.add_parser("export", help="write the cache for another runtime: per-head K/V and positions "
                                 "as safetensors, a llama.cpp sequence state, or an MLX-LM prompt cache")
    export.add_argument("file")
    export.add_argument("output")
    export.add_argument("--to", choices=TARGETS, default="safetensors")
    export.add_argument("--dtype", choices=sorted(EXPORT_DTYPES),
                        help="safetensors (default float32) and mlx (default float16): element type of K and V")
    export.add_argument("--gguf", help="llama.cpp: the GGUF model file the runtime loads (checked against the .kvc)")
    export.add_argument("--cache-type", choices=sorted(CACHE_TYPES), default="f16",
                        help="llama.cpp: the runtime context's K/V cache type")
    export.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                        help="llama.cpp: the runtime context runs without flash attention (V stored transposed)")
    export.add_argument("--mlx-model", help="mlx: the model folder or repo MLX-LM loads, recorded in the file "
                        "(default: the model the .kvc names)")
    export.set_defaults(run=_export)
    args = parser.parse_args(argv)
    try:
        print(args.run(args))
    except (KvcFormatError, ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
