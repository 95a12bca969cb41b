"""What `kvc models` lists, without loading, converting or assembling any model."""

from pathlib import Path

from ..errors import KvcError


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def packaged_info(alias: str) -> dict:
    """A packaged model's state: installed, assembled, converted, or what is missing."""
    from .files import PACKAGED, converted_location, is_converted, packaged_gguf

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


def models_info() -> dict:
    """The packaged models, the hub aliases (and whether each is in the local Hugging Face cache), the tested
    families and the conversions kept in kvc's cache folder."""
    from huggingface_hub import try_to_load_from_cache

    from .families import TESTED_FAMILIES
    from .files import EMBEDDED, HUB_ALIASES, PACKAGED, cache_dir, converted_models

    packaged = [{**packaged_info(alias), "default": alias == EMBEDDED} for alias in PACKAGED]
    aliases = [{"alias": alias, "hub_id": repo, "cached": isinstance(try_to_load_from_cache(repo, "config.json"), str)}
               for alias, repo in HUB_ALIASES.items()]
    converted = [{"folder": str(f), "bytes": _folder_bytes(f)} for f in converted_models()]
    return {"packaged": packaged, "aliases": aliases, "families": TESTED_FAMILIES, "cache_dir": str(cache_dir()),
            "converted": converted}
