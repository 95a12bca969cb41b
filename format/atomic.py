"""Atomic file creation: write to a hidden temporary file beside the target, fsync, then rename over it."""

import contextlib
import os
from pathlib import Path


class AtomicFile:
    """A binary file that appears at `path` only when `commit()` is called; `discard()` removes every trace."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.file = open(self.tmp_path, "wb")  # noqa: SIM115 (closed by commit/discard)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp_path, self.path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)
