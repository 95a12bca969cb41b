"""`kvc compress` on a corpus: one model for many documents, one `.kvc` per document named by its content and the
settings, a manifest row per document, and a rerun that skips what is already done (verified, not just present).

The pieces both engines share live here: `Job` (the options and the output folder), `Compressor` (one model,
documents in, manifest rows out, never raising for one document's fault), `Manifest`, and the local engine
(`run_local`); kvzip_cli.corpus.on_ray runs the same Compressor in Ray actors.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kvc_format import KvcFormatError, KvcReader

from .. import __version__
from ..compress.settings import Settings
from ..errors import KvcError, UsageError
from ..progress import TaskFactory, silent_task
from ..sizes import raw_fp16_bytes

MANIFEST = "manifest.jsonl"
STEM_CHARS = 60  # of a document's name kept in its output's name


@dataclass(frozen=True)
class Job:
    """What a corpus run does to each document: compress it with `model` (as named) on `device` in `dtype` under
    `settings` into `out_dir`; `threads` the CPU threads torch computes with."""

    out_dir: Path
    model: str
    settings: Settings
    device: str
    dtype: str
    device_kind: str  # "cpu" or "cuda": where the model computes, which changes the bytes
    threads: int

    @property
    def settings_digest(self) -> str:
        """8 hex digits over everything that changes a file's bytes but the document: kvc's version, the model as
        named, every option, the device kind and, on the CPU, the thread count (the value refit's least squares
        rounds differently with another)."""
        options = {"model": self.model, "dtype": self.dtype, **dataclasses.asdict(self.settings)}
        threads = self.threads if self.device_kind == "cpu" else None
        identity = {"kvc": __version__, "options": options, "device": self.device_kind, "threads": threads}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def output(self, source: str, digest: str) -> Path:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/")).stem)[:STEM_CHARS] or "document"
        return self.out_dir / f"{stem}-{digest[:12]}-{self.settings_digest}.kvc"


def row(source: str, **fields) -> dict:
    """A manifest row: every key present, in a fixed order."""
    base = {"source": source, "digest": None, "output": None, "status": "error", "error": None, "tokens": None,
            "kept_ratio": None, "file_bytes": None, "compression": None, "seconds": None}
    return {**base, **fields}


def one_line(exc: BaseException) -> str:
    """An exception as the single line the manifest records (the CLI's own wording for kvc's errors)."""
    if isinstance(exc, KvcError):
        text = str(exc)
    elif isinstance(exc, KvcFormatError):
        text = f"invalid .kvc file: {exc}"
    elif isinstance(exc, OSError) and exc.filename:
        text = f"{exc.strerror or exc}: {exc.filename}"
    elif isinstance(exc, MemoryError):
        text = "out of memory; try a smaller --chunk-size or a shorter document"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def existing(path: Path, digest: str, job: Job) -> dict | None:
    """The manifest fields of a complete file at `path` made from this document with these settings, or None:
    the file verifies (every checksum) and its header names this document, this model and these settings."""
    if not path.is_file():
        return None
    try:
        with KvcReader(path) as reader:
            header = reader.header
            settings = header.get("settings", {})
            same = (header.get("document", {}).get("sha256") == digest
                    and header.get("model", {}).get("name") == job.model
                    and all(settings.get(k) == v for k, v in job.settings.record().items()))
            if not same:
                return None
            reader.verify()
            geometry = reader.geometry
    except (KvcFormatError, OSError, AttributeError, TypeError):  # unreadable, or a header not as kvc writes it
        return None
    size = path.stat().st_size
    raw = raw_fp16_bytes(geometry.held_entries, geometry.head_dim)
    return {"tokens": geometry.tokens, "kept_ratio": settings.get("kept_ratio"), "file_bytes": size,
            "compression": raw / size}


class Compressor:
    """Compresses documents into `job.out_dir` with one model, loaded when a document first needs it. A document's
    own fault (unreadable, not UTF-8, too long for the model…) becomes its row's error; a usage error or a model
    that does not load raises, as it would fail every document."""

    def __init__(self, job: Job):
        self.job = job
        self._lm = None
        import torch

        torch.set_num_threads(job.threads)  # a Ray actor's default is 1 (OMP_NUM_THREADS): say it for every engine

    def model(self):
        if self._lm is None:
            from ..models.loading import load_model

            self._lm = load_model(self.job.model, device=self.job.device, dtype=self.job.dtype)
        return self._lm

    def from_path(self, source: str, task: TaskFactory = silent_task) -> dict:
        """The row of the document at a local path; `task` shows its phases."""
        from ..document import read_document

        return self._compress(source, lambda: read_document(source), task)

    def from_bytes(self, source: str, data: bytes) -> dict:
        """The row of a document already read (by Ray's readers)."""
        from ..document import decode_document

        return self._compress(source, lambda: decode_document(data, source))

    def _compress(self, source: str, read: Callable[[], str], task: TaskFactory = silent_task) -> dict:
        started = time.perf_counter()
        try:
            text = read()
        except (KvcError, OSError) as exc:
            return row(source, error=one_line(exc), seconds=time.perf_counter() - started)
        digest = hashlib.sha256(text.encode()).hexdigest()
        output = self.job.output(source, digest)
        done = existing(output, digest, self.job)
        if done is not None:
            return row(source, digest=digest, output=str(output), status="skipped", **done,
                       seconds=time.perf_counter() - started)
        lm = self.model()
        from ..compress.pipeline import compress_text

        try:
            result = compress_text(text, output, model=lm, settings=self.job.settings, source=source, task=task)
        except UsageError:
            raise
        except Exception as exc:
            if os.environ.get("KVC_DEBUG"):
                raise
            return row(source, digest=digest, error=one_line(exc), seconds=time.perf_counter() - started)
        return row(source, digest=digest, output=str(output), status="ok", tokens=result.tokens,
                   kept_ratio=result.kept_ratio, file_bytes=result.file_bytes, compression=result.compression,
                   seconds=time.perf_counter() - started)


class Manifest:
    """OUT_DIR/manifest.jsonl: the rows of this run, each appended and flushed as its document finishes (an
    interrupted run leaves the finished ones), rewritten whole in the documents' order when the run ends."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST
        self.rows: list[dict] = []
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def add(self, entry: dict) -> None:
        self.rows.append(entry)
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def finish(self, order: list[str]) -> None:
        """Rewrite the rows in the order of `order` (the sources), atomically."""
        self._file.close()
        position = {source: i for i, source in enumerate(order)}
        self.rows.sort(key=lambda r: position.get(r["source"], len(order)))
        partial = self.path.with_name(f".{MANIFEST}.partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        os.replace(partial, self.path)

    def close(self) -> None:
        self._file.close()


def summary(rows: list[dict], manifest: Path, seconds: float, engine: str) -> dict:
    count = {status: sum(r["status"] == status for r in rows) for status in ("ok", "skipped", "error")}
    tokens = sum(r["tokens"] or 0 for r in rows if r["status"] == "ok")
    return {"documents": len(rows), "ok": count["ok"], "skipped": count["skipped"], "errors": count["error"],
            "seconds": seconds, "manifest": str(manifest), "engine": engine, "tokens": tokens,
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "documents_per_hour": 3600 * count["ok"] / seconds if seconds > 0 else None}


def run(sources: list[str], job: Job, rows: Callable[[TaskFactory], Iterable[dict]], engine: str,
        progress: bool) -> dict:
    """Drive an engine: `rows(task)` (a generator, started here; `task` shows the phases of a document compressed
    in this process) yields the rows as documents finish; each goes to the manifest and the progress display.
    Returns the summary."""
    from .progress import corpus_progress

    started = time.perf_counter()
    job.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(job.out_dir)
    with contextlib.closing(manifest), corpus_progress(progress, len(sources)) as display:
        for entry in rows(display.task):
            manifest.add(entry)
            display(entry)
        manifest.finish(sources)
    return summary(manifest.rows, manifest.path, time.perf_counter() - started, engine)


def run_local(sources: list[str], out_dir: Path, model: str, settings: Settings, *, device: str = "auto",
              dtype: str = "auto", threads: int | None = None, progress: bool = False) -> dict:
    """The local engine: this process, one model, the documents in order; the summary."""
    import torch

    from ..devices import resolve_device

    job = Job(out_dir, model, settings, device, dtype, resolve_device(device).type, threads or torch.get_num_threads())

    def rows(task: TaskFactory):
        compressor = Compressor(job)
        for source in sources:
            yield compressor.from_path(source, task)

    return run(sources, job, rows, "local", progress)
