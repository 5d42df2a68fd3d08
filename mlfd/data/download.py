"""Checksum-verified downloads and safe archive extraction for the data root."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from mlfd.errors import DatasetNotFound, MlfdError

_TIMEOUT_S = 60

# Off while a command must fetch nothing (a dry run): the registry then plans the download
# instead of making it, and download_file refuses as a backstop.
_FETCH = {"on": True}


@contextlib.contextmanager
def no_fetch():
    before = _FETCH["on"]
    _FETCH["on"] = False
    try:
        yield
    finally:
        _FETCH["on"] = before


def fetch_allowed() -> bool:
    return _FETCH["on"]


def _hasher(md5: str | None, sha256: str | None) -> tuple[object | None, str | None]:
    if md5 and sha256:
        raise MlfdError("give either an md5 or a sha256 checksum, not both")
    if sha256:
        return hashlib.sha256(), sha256.lower()
    if md5:
        return hashlib.md5(usedforsecurity=False), md5.lower()
    return None, None


def file_matches(path: Path, md5: str | None = None, sha256: str | None = None) -> bool:
    """True when ``path`` exists and matches the checksum (any existing file if none given)."""
    if not path.is_file():
        return False
    hasher, expected = _hasher(md5, sha256)
    if hasher is None:
        return True
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest() == expected


def download_file(
    url: str, dest: str | os.PathLike, md5: str | None = None, sha256: str | None = None
) -> Path:
    """Fetch ``url`` to ``dest``, verifying the checksum; an already valid ``dest`` is kept.

    The data goes to a temporary file beside ``dest`` and is renamed only once verified,
    so an interrupted or corrupt download never leaves a file at ``dest``.
    """
    dest = Path(dest)
    if file_matches(dest, md5, sha256):
        return dest
    if not fetch_allowed():
        raise MlfdError(f"not downloading {url} to {dest}: this command fetches nothing")
    hasher, expected = _hasher(md5, sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
        if hasher is not None and hasher.hexdigest() != expected:
            raise MlfdError(
                f"checksum mismatch for {url}: expected {expected}, got {hasher.hexdigest()}; "
                "the download was discarded"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetNotFound(
            f"could not download {url} to {dest}: {exc}; place the file there by hand"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download_first(
    urls: list[str], dest: str | os.PathLike, md5: str | None = None, sha256: str | None = None
) -> Path:
    """Try mirrors in turn; a checksum mismatch is final (it is not a network problem)."""
    error: DatasetNotFound | None = None
    for url in urls:
        try:
            return download_file(url, dest, md5=md5, sha256=sha256)
        except DatasetNotFound as exc:
            error = exc
    assert error is not None, "no URLs given"
    raise error


def _check_member(member: tarfile.TarInfo, dest: Path) -> None:
    target = (dest / member.name).resolve()
    if not target.is_relative_to(dest):
        raise MlfdError(f"unsafe path in archive: {member.name!r} escapes {dest}")
    if not (member.isfile() or member.isdir()):
        raise MlfdError(f"unsupported archive member {member.name!r} (links/devices refused)")


def extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a (compressed) tar into ``dest``, refusing absolute/.. paths and links."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, dest)
            # The 'data' filter (Python >= 3.11.4) re-checks the same rules inside tarfile.
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kwargs)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MlfdError(f"cannot extract {archive}: {exc}") from None
    return dest


def _check_zip_member(info: zipfile.ZipInfo, dest: Path) -> None:
    name = info.filename.replace("\\", "/")
    # zipfile.extractall would silently strip '..' and leading '/'; a crafted name is refused.
    if name.startswith("/") or ".." in PurePosixPath(name).parts or ":" in name.split("/")[0]:
        raise MlfdError(f"unsafe path in archive: {info.filename!r} escapes {dest}")
    if not (dest / name).resolve().is_relative_to(dest):
        raise MlfdError(f"unsafe path in archive: {info.filename!r} escapes {dest}")
    if (info.external_attr >> 16) & 0o170000 == 0o120000:  # Unix symlink bit in the mode
        raise MlfdError(f"unsupported archive member {info.filename!r} (links refused)")


def extract_zip(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a zip into ``dest``, refusing absolute/.. paths and symlinks."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                _check_zip_member(info, dest)
            zf.extractall(dest, members=members)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise MlfdError(f"cannot extract {archive}: {exc}") from None
    return dest


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A .zip (by name: a tar can embed zip-like bytes) or a (compressed) tar."""
    if os.fspath(archive).lower().endswith(".zip"):
        return extract_zip(archive, dest)
    return extract_tar(archive, dest)


def fetch_and_extract(
    url: str, archive: Path, dest: Path, md5: str | None = None, sha256: str | None = None
) -> None:
    """Download an archive, extract it, then drop the archive to save space."""
    download_file(url, archive, md5=md5, sha256=sha256)
    extract_archive(archive, dest)
    archive.unlink(missing_ok=True)


__all__ = [
    "download_file",
    "download_first",
    "extract_archive",
    "extract_tar",
    "extract_zip",
    "fetch_and_extract",
    "fetch_allowed",
    "file_matches",
    "no_fetch",
]
