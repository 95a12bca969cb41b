"""Atomic file creation: the file appears at its path complete, or not at all.

On Linux the bytes go to an unnamed file in the target's directory (O_TMPFILE), which is given a name only when it
is complete: a writer killed outright (SIGKILL, power loss) leaves nothing behind. Elsewhere, or on file systems
without O_TMPFILE, they go to a hidden `.NAME.PID.partial` file that `discard()` removes; only an uncatchable kill
can leave that one behind. Either way the data is fsynced before the rename over the target.

Naming an unnamed file takes linkat() through /proc/self/fd or with AT_EMPTY_PATH; where the system allows
neither, the finished bytes are copied to the hidden file instead (correct, one extra copy).
"""

import contextlib
import ctypes
import errno
import os
import shutil
from pathlib import Path

_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)
_AT_FDCWD, _AT_EMPTY_PATH = -100, 0x1000


def _unnamed_file(directory: Path) -> int | None:
    """A writable file descriptor of an unnamed file in `directory`, or None where that is not possible."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        return os.open(directory, flag | os.O_RDWR, 0o666)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise


def _link(fd: int, name: Path) -> bool:
    """Give the unnamed file `fd` the name `name`; False where the system refuses both ways of doing it."""
    with contextlib.suppress(OSError):
        os.link(f"/proc/self/fd/{fd}", name, follow_symlinks=True)
        return True
    try:
        linkat = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):
        return False
    return linkat(fd, b"", _AT_FDCWD, os.fsencode(name), _AT_EMPTY_PATH) == 0


class AtomicFile:
    """A binary file that appears at `path` only when `commit()` is called; `discard()` removes every trace."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        fd = _unnamed_file(self.path.parent)
        self.unnamed = fd is not None
        self.file = os.fdopen(fd, "w+b") if fd is not None else open(self.tmp_path, "wb")  # noqa: SIM115

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        try:
            if self.unnamed:
                with contextlib.suppress(FileNotFoundError):  # a stale name from a killed process of this pid
                    os.unlink(self.tmp_path)
                if not _link(self.file.fileno(), self.tmp_path):
                    self._copy_to_named()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.discard()
            raise
        self.file.close()
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _copy_to_named(self) -> None:
        self.file.seek(0)
        with open(self.tmp_path, "wb") as named:
            shutil.copyfileobj(self.file, named, 1 << 24)
            named.flush()
            os.fsync(named.fileno())

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)
