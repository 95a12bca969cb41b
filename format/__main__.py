"""`python -m kvc_format`: check, describe or export a `.kvc` file without torch (for edge devices).

    python -m kvc_format verify doc.kvc
    python -m kvc_format info doc.kvc
    python -m kvc_format export doc.kvc doc.safetensors [--dtype float16]
"""

import argparse
import dataclasses
import json
import sys

from .errors import KvcFormatError
from .export import EXPORT_DTYPES, export_file
from .reader import KvcReader


def _verify(args) -> str:
    with KvcReader(args.file) as reader:
        reader.verify()
        return f"ok: {args.file} (format {reader.version[0]}.{reader.version[1]}, {reader.file_size} bytes)"


def _info(args) -> str:
    with KvcReader(args.file) as reader:
        geometry = dataclasses.asdict(reader.geometry)
        return json.dumps({"format": list(reader.version), "bytes": reader.file_size, "cache": geometry,
                           "model": reader.header["model"], "settings": reader.header.get("settings")}, indent=2)


def _export(args) -> str:
    written = export_file(args.file, args.output, args.dtype)
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
    export = commands.add_parser("export", help="write per-head K/V and positions to a safetensors file")
    export.add_argument("file")
    export.add_argument("output")
    export.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="float32")
    export.set_defaults(run=_export)
    args = parser.parse_args(argv)
    try:
        print(args.run(args))
    except (KvcFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
