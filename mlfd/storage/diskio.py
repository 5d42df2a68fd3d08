"""Writes that fail as one line naming the file, and leave no temporary file behind.

A full disk does not always raise OSError: torch.save fails with a RuntimeError of its zip
writer ("unexpected pos ..."), safetensors with a SafetensorError ("I/O error: No space
left on device"), and a failed ``write()`` has an OSError without a file name. The write
sites translate them here into a ``FilesystemError`` (exit 3) that names the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath

from ..errors import FilesystemError

REASONS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.ENOTDIR: "not a directory", errno.EDQUOT: "disk quota exceeded"}
# How libraries that do not raise OSError say it (safetensors quotes the OS error).
_SAID = (("no space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC),
         ("disk quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT))
# A write that failed with less free space than this beside it is put down to a full disk:
# torch's zip writer says only that the write was short.
LOW_SPACE = 64 << 20


def describe(e: OSError, path: str | PurePath | None = None) -> str:
    """``reason: path`` in one line; the path the error names, else ``path``."""
    reason = REASONS.get(e.errno, e.strerror or str(e))
    where = e.filename or path
    return f"{reason}: {where}" if where else reason


def _low_space(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE
    except OSError:  # the directory is gone, or not a local one
        return False


def failed_write(e: Exception, path: str | PurePath) -> FilesystemError | None:
    """The FilesystemError that a failed write of ``path`` amounts to; None when the
    failure is not the filesystem's (a bug: let it through as it is)."""
    if isinstance(e, OSError):
        line, code = describe(e, path), e.errno
    else:
        text = str(e).lower()
        code = next((c for said, c in _SAID if said in text), None)
        if code is None and _low_space(Path(path).parent):
            code = errno.ENOSPC
        if code is not None:
            line = f"{REASONS[code]}: {path}"
        elif "unexpected pos" in text:  # torch's zip writer: a short write, cause unknown
            line, code = f"could not write {path} (a short write: disk full or over quota?)", \
                errno.ENOSPC
        else:
            return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        line += "; free some space and run the same command again"
    return FilesystemError(line)


@contextlib.contextmanager
def writing(path: str | PurePath) -> Iterator[None]:
    """Failures of the writes in this block as one FilesystemError naming ``path``
    (or the file an OSError names)."""
    try:
        yield
    except FilesystemError:
        raise
    except Exception as e:
        err = failed_write(e, path)
        if err is None:
            raise
        raise err from None


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)``, then rename tmp over ``path``: a kill leaves the old file or the new
    one, never half of one. Any failure (a full disk, Ctrl-C) removes tmp; the
    filesystem's is raised as a FilesystemError naming ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        # judged before tmp goes: its blocks are the space that ran out
        err = failed_write(e, path) if isinstance(e, Exception) else None
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if err is None:
            raise
        raise err from None


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
