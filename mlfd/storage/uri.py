"""Where things live: a local path or an fsspec URL (``s3://``, ``memory://``, chained
``simplecache::...``), checked and joined the same way for both."""

from __future__ import annotations

from pathlib import Path

from ..errors import MlfdError


def check_uri(uri: str) -> str | None:
    """Why fsspec cannot open ``uri`` (None: it can, or it is a plain local path)."""
    if "://" not in uri:
        return None
    import fsspec
    from fsspec.registry import known_implementations

    for protocol in uri.split("://", 1)[0].split("::"):  # chained: simplecache::s3://...
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError:
            package = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
            return (f"fsspec has no filesystem for {protocol!r}"
                    + (f" (pip install {package})" if package else ""))
        except ValueError:
            return f"fsspec has no filesystem for {protocol!r}"
    return None


def cache_root(uri: str | None, base: Path) -> Path | str:
    """Where cache stores live: ``base`` without a URI; a local path for a plain path (taken
    relative to ``base``) or a ``file://`` URL; the URL itself otherwise."""
    if not uri:
        return Path(base)
    if "://" not in uri:
        return Path(base) / Path(uri).expanduser()
    fs, path = url_to_fs(uri)
    return Path(path) if fs is None else uri.rstrip("/")


def join(location: Path | str, *parts: str) -> Path | str:
    """``location / part / ...`` for a local path or a URL."""
    if isinstance(location, str):
        return "/".join([location.rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


def url_to_fs(url: str):
    """(fsspec filesystem, path on it), or (None, path) for the local disk."""
    if why := check_uri(url):
        raise MlfdError(f"cache location {url}: {why}")
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, path = url_to_fs(url)
    return (None, path) if isinstance(fs, LocalFileSystem) else (fs, path)
