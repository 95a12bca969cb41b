"""The documents of a corpus run: DOCUMENT arguments (files, folders, globs) and `--list` files, expanded to an
ordered list without repeats. Local paths are expanded here; a URI (`s3://…`) is kept as given, for the Ray
engine's readers (kvzip_cli.corpus.on_ray lists what lies under it)."""

import glob
import json
import os
from pathlib import Path

from ..errors import KvcError, UsageError

GLOB_CHARS = "*?["


def is_uri(source: str) -> bool:
    return "://" in source


def is_corpus(documents: list[str], output: Path, list_file: Path | None) -> bool:
    """Whether `kvc compress` runs on a corpus: a list, several documents, a folder, a glob, or -o a folder."""
    if list_file is not None or len(documents) != 1:
        return True
    (document,) = documents
    if document == "-":
        return False
    if output.is_dir():
        return True
    if Path(document).is_file():
        return False
    return Path(document).is_dir() or is_uri(document) or any(c in document for c in GLOB_CHARS)


def read_list(list_file: Path) -> list[str]:
    """The paths a list names: JSON lines with a `path` key, or one path per line; blank and `#` lines skipped.
    Relative paths are taken from the current folder, as on the command line."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise KvcError(f"list {list_file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KvcError(f"list {list_file} cannot be read: {exc}") from None
    paths = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                path = json.loads(line).get("path")
            except (json.JSONDecodeError, AttributeError):
                path = None
            if not isinstance(path, str) or not path:
                raise KvcError(f"list {list_file} line {number}: a JSON line needs a \"path\" string")
            line = path
        paths.append(line)
    return paths


def _folder_files(folder: Path, skip: Path) -> list[str]:
    """Every file under `folder`, sorted, but hidden ones, .kvc files and those under `skip` (the output folder)."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative) or path.suffix == ".kvc" or not path.is_file():
            continue
        if path.resolve().is_relative_to(skip):
            continue
        found.append(str(path))
    return found


def _key(source: str) -> str:
    """What makes two sources the same document: `a.txt` and `./a.txt` are one."""
    return source if is_uri(source) else os.path.abspath(source)


def expand(documents: list[str], list_file: Path | None, output_dir: Path) -> list[str]:
    """The documents to compress, in order, each once. A named file that does not exist stays in the list (its row
    will say so); a glob or folder that matches nothing is an error, as is an empty corpus."""
    given = list(documents) + (read_list(list_file) if list_file is not None else [])
    if "-" in given:
        raise UsageError("stdin (-) is a single document: give it alone with -o FILE.kvc")
    skip = output_dir.resolve()
    sources: list[str] = []
    for source in given:
        if is_uri(source):
            found = [source]
        elif Path(source).is_dir():
            found = _folder_files(Path(source), skip)
        elif any(c in source for c in GLOB_CHARS) and not Path(source).exists():
            found = sorted(p for p in glob.glob(source, recursive=True) if Path(p).is_file())
            if not found:
                raise KvcError(f"{source} matches no file")
        else:
            found = [source]
        sources.extend(found)
    first: dict[str, str] = {}
    for source in sources:
        first.setdefault(_key(source), source)
    unique = list(first.values())
    if not unique:
        raise KvcError("no document to compress (the folders given hold no file)")
    return unique
