"""`kvc models`: the models kvc can run and what is installed (kvzip_cli.models.catalog)."""

import typer

from ..models.catalog import models_info
from ..report import mb
from .common import JsonOption, cli_errors, emit_json


@cli_errors
def models(json_output: JsonOption = False):
    """List the packaged models, the hub aliases, the model families kvc is tested on, and the GGUF conversions
    kvc keeps (no model is loaded). --model also takes a hub id, a model folder or a .gguf file."""
    info = models_info()
    if json_output:
        emit_json(info)
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
               + "".join(f"\n          {c['folder']} ({mb(c['bytes'])})" for c in info["converted"]))
