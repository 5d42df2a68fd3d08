"""The cache store's layout: where its files lie, how arrays are chunked, sharded and
compressed, and how logical dtypes are stored.

Layout: one group per (dataset, split) inside a stage's ``.zarr`` store; arrays have the
sample index as the first axis and the view id as the second; ``labels`` beside them.
Arrays are sharded (zarr v3 ``sharding_indexed``): ~1 MiB inner chunks, each compressed
(Blosc zstd or lz4 with byte shuffle, or not at all) and followed by its crc32c, are packed
into shard files of ~64 MiB along the sample axis, so a million-row cache is some hundreds
of files, not millions. Inner chunks of (N, V, ...) arrays hold one view each (``layout``):
a streamed epoch reads only the views it uses. The group's attributes hold the fingerprint
(a dict of everything the values depend on, plus its digest), the array specs with their
logical dtypes (``bfloat16`` is stored as its uint16 bit pattern: numpy has no bfloat16),
the codec and a ``complete`` flag.

    <parent>/<name>/              the last COMPLETE group, with manifest.json (and
                                  verified.json: which files status() already checked;
                                  damaged.json: arrays that failed to decode when read)
    <parent>/.<name>.partial/     the extraction in progress, with progress.json (and
                                  progress.rank<r>.json: each rank's cursors, torchrun)
    <parent>/.<name>.old/         local disks only, for an instant while a group is promoted
    <name>/c/<shard>/0/...        a shard file: inner chunks, then their index (+ crc32c)

Locations: a local path, or any fsspec URL (``file://`` URLs are local paths;
``memory://``, ``s3://`` with s3fs, ...): ``_LocalDir`` and ``_RemoteDir`` give both the
same handful of operations. How writes are staged and promoted: ``writer``; how damage is
caught: ``integrity``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MlfdError
from ..storage.uri import url_to_fs

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 1 << 20  # ~1 MiB inner chunks along the sample axis (the unit zarr decodes)
SHARD_BYTES = 64 << 20  # ~64 MiB shard files (the unit written, resumed and listed)
FORMAT = 3  # 3: sharded arrays; 2: staging, manifest, per-chunk crc32c. Others are rebuilt.
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
VERIFIED = "verified.json"
DAMAGED = "damaged.json"  # arrays that failed to decode when read: rebuild the group
BOOKKEEPING = (MANIFEST, PROGRESS, VERIFIED, DAMAGED)  # beside the arrays, not in the manifest
# A sharded extraction's ranks each keep their cursors in their own file (no shared writes)
RANK_PROGRESS = re.compile(r"progress\.rank\d+\.json")
STORED_AS = {"bfloat16": "uint16"}  # logical dtype -> dtype of the zarr array
# A file whose mtime is this recent when it is checked may change again within the same
# clock tick without its mtime moving: it is re-read next time rather than trusted.
RACY_NS = 2_000_000_000


def _zarr():
    import zarr  # imported lazily: CLI start-up stays fast

    return zarr


def _codecs(codec: str, clevel: int) -> list:
    from zarr.codecs import BloscCodec, Crc32cCodec

    # Byte shuffle groups the high bytes of fp16/fp32 values: zstd/lz4 then find the
    # redundancy. crc32c over the compressed bytes: zarr verifies each chunk as it reads it.
    # With shards= these are the inner chunks' codecs (each shard index has its own crc32c).
    packed = [] if codec == "none" else [BloscCodec(cname=codec, clevel=clevel, shuffle="shuffle")]
    return [*packed, Crc32cCodec()]


def to_tensor(values: np.ndarray, logical_dtype: str) -> torch.Tensor:
    """A loaded cache array as a tensor of its logical dtype, sharing its memory.

    ``bfloat16`` arrays come out of ``CacheGroup.load()`` as their uint16 bit patterns."""
    import torch

    values = np.ascontiguousarray(values)
    if logical_dtype == "bfloat16":
        if values.dtype != np.uint16:
            raise MlfdError(f"a bfloat16 cache array is stored as uint16, got {values.dtype}")
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def _logical(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return name if name in STORED_AS else np.dtype(name).name


def _to_stored(values, logical: str, stored: np.dtype) -> np.ndarray:
    """Incoming rows (numpy or torch) in the array's stored dtype; bfloat16 is rounded by
    torch (round to nearest even), exactly as ``tensor.to(torch.bfloat16)``."""
    if logical == "bfloat16":
        if isinstance(values, np.ndarray) and values.dtype == np.uint16:
            return values  # bit patterns, as load() returns them
        import torch

        t = values.detach().cpu() if isinstance(values, torch.Tensor) \
            else torch.as_tensor(np.asarray(values))
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if stored in (np.float16, np.float32) and (hasattr(values, "detach") or (
            isinstance(values, np.ndarray) and values.dtype != stored
            and values.dtype.kind == "f")):
        # torch rounds float32 -> float16 to nearest even exactly as numpy does, several
        # times faster (vectorised, threaded), and on the tensor's device: a GPU converts
        # before the copy to the host, which then moves half the bytes
        import torch

        t = values.detach() if hasattr(values, "detach") else torch.from_numpy(values)
        return t.to(torch.float16 if stored == np.float16 else torch.float32).cpu().numpy()
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu()
        values = (values.float() if str(values.dtype) == "torch.bfloat16" else values).numpy()
    return np.asarray(values, dtype=stored)


# --------------------------------------------------------------------------- locations


def stores_under(location: Path | str) -> list[tuple[str, _LocalDir | _RemoteDir]]:
    """(path or URL, handle with ``nbytes()``, ``remove()``) of every directory named like
    a cache store directly under ``location`` (``*.zarr``, ``.*.zarr.partial``), for
    `mlfd clean`: whose are they is for ``foreign`` to say."""
    fs, path = (None, location) if not isinstance(location, str) else url_to_fs(location)
    if fs is None:
        base = Path(path)
        found = sorted({p for pattern in ("*.zarr", ".*.zarr.partial")
                        for p in base.glob(pattern) if p.is_dir()})
        return [(str(p), _LocalDir(p)) for p in found]
    out = []
    for pattern in ("*.zarr", ".*.zarr.partial"):
        for p in sorted(fs.glob(f"{str(path).rstrip('/')}/{pattern}")):
            if fs.isdir(p):
                out.append((f"{location.rstrip('/')}/{p.rsplit('/', 1)[-1]}", _RemoteDir(fs, p)))
    return out


@dataclass
class _Stat:
    size: int
    key: list | None  # what must be unchanged for an earlier check to stand (None: nothing)
    racy: bool = False  # modified too recently for the key to prove anything yet


def _is_bookkeeping(rel: str) -> bool:
    rel = rel.removesuffix(".tmp")
    return rel in BOOKKEEPING or RANK_PROGRESS.fullmatch(rel) is not None


def rank_progress(rank: int) -> str:
    return f"progress.rank{rank}.json"


class _LocalDir:
    """A directory on the local disk: pathlib, atomic renames."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self, rel: str) -> bool:
        return (self.path / rel).exists()

    def read(self, rel: str) -> bytes:
        return (self.path / rel).read_bytes()

    def open(self, rel: str):
        return open(self.path / rel, "rb")

    def write_json(self, rel: str, obj) -> None:
        """Write then rename: a kill leaves the old file or the new one, never half of one."""
        tmp = self.path / (rel + ".tmp")
        try:
            tmp.write_text(json.dumps(obj))
            os.replace(tmp, self.path / rel)
        except BaseException:  # a full disk, Ctrl-C: no half-written tmp stays behind
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def delete(self, rel: str) -> None:
        (self.path / rel).unlink(missing_ok=True)

    def remove(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)

    def files(self, now_ns: int = 0) -> dict[str, _Stat]:
        out = {}
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and not _is_bookkeeping(rel):
                st = p.stat()
                # ctime and inode too: a rewrite that restores the mtime, or a copy, is
                # not the file that was checked
                out[rel] = _Stat(st.st_size, [st.st_mtime_ns, st.st_ctime_ns, st.st_ino],
                                 st.st_mtime_ns >= now_ns - RACY_NS)
        return out

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def listing(self) -> list[str]:
        """Every entry but directories (bookkeeping, links and sockets too), relative."""
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                      if p.is_symlink() or not p.is_dir())

    def sub(self, rel: str) -> _LocalDir:
        return _LocalDir(self.path / rel)

    def is_link(self) -> bool:
        return self.path.is_symlink()

    def zarr_store(self, read_only: bool = False):
        return str(self.path)  # zarr opens a LocalStore

    def drop_shards(self, array: str, keep: set[int]) -> None:
        """Delete the array's shard files, but those in ``keep``."""
        grid = self.path / array / "c"
        for p in grid.iterdir() if grid.is_dir() else ():
            if p.name.isdigit() and int(p.name) not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


class _RemoteDir:
    """A "directory" on an fsspec filesystem (object stores: a key prefix)."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, str(path).rstrip("/")

    def _p(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def open(self, rel: str):
        return self.fs.open(self._p(rel), "rb")

    def write_json(self, rel: str, obj) -> None:
        self.fs.pipe_file(self._p(rel), json.dumps(obj).encode())  # one PUT: whole or absent

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._p(rel))

    def remove(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def _find(self) -> dict[str, dict]:
        try:
            found = self.fs.find(self.path, detail=True)
        except FileNotFoundError:
            return {}
        root = self.fs._strip_protocol(self.path).rstrip("/") + "/"
        return {name[len(root):]: info for name, info in sorted(found.items())
                if name.startswith(root) and info.get("type", "file") == "file"}

    def files(self, now_ns: int = 0) -> dict[str, _Stat]:
        out = {}
        for rel, info in self._find().items():
            if _is_bookkeeping(rel):
                continue
            etag = info.get("ETag") or info.get("etag")
            if etag:  # changes with every rewrite of the object
                out[rel] = _Stat(int(info["size"]), ["etag", str(etag)])
                continue
            t = _time_ns(info.get("mtime") or info.get("LastModified")
                         or info.get("last_modified") or info.get("created"))
            out[rel] = _Stat(int(info["size"]), None if t is None else ["time", t],
                             t is not None and t >= now_ns - RACY_NS)
        return out

    def nbytes(self) -> int:
        return sum(int(info.get("size", 0)) for info in self._find().values())

    def listing(self) -> list[str]:
        return sorted(self._find())

    def sub(self, rel: str) -> _RemoteDir:
        return _RemoteDir(self.fs, self._p(rel))

    def is_link(self) -> bool:
        return False

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import FsspecStore

        # from_mapper wraps a synchronous filesystem (memory://, ...) for zarr's async API
        return FsspecStore.from_mapper(self.fs.get_mapper(self.path), read_only=read_only)

    def drop_shards(self, array: str, keep: set[int]) -> None:
        prefix = f"{array}/c/"
        for rel in self._find():
            if rel.startswith(prefix) and int(rel[len(prefix):].split("/")[0]) not in keep:
                self.fs.rm_file(self._p(rel))

    def copy_to(self, rel: str, other: _RemoteDir) -> None:
        self.fs.cp_file(self._p(rel), other._p(rel))


def _time_ns(t) -> int | None:
    if isinstance(t, datetime):
        return int(t.timestamp() * 1e9)
    if isinstance(t, (int, float)):
        return int(t * 1e9)
    if isinstance(t, str):
        with contextlib.suppress(ValueError):
            return int(datetime.fromisoformat(t).timestamp() * 1e9)
    return None


# --------------------------------------------------------------------------- chunking


def _shard_rows(arr) -> int:
    return (arr.shards or arr.chunks)[0]


def layout(shape, itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape) of a new array: ~CHUNK_BYTES chunks, ~SHARD_BYTES
    shards (or the whole array if smaller), both along the sample axis.

    An array of three or more axes is (N, V, ...): its chunks hold ONE view of their rows,
    (R, 1, ...), while its shards still hold all views of theirs, (S, V, ...), S a multiple
    of R. A streamed epoch that uses one view per chunk then decodes 1/V of the bytes, and
    whole-shard writes along the sample axis are unchanged. Whole-array reads (fuse, an
    in-memory distill) decode the same bytes in V times as many chunks. Smaller arrays
    (labels, (N, features)) keep whole rows per chunk."""
    shape = tuple(int(n) for n in shape)
    per_view = len(shape) >= 3
    inner = (1, *shape[2:]) if per_view else shape[1:]
    row = int(np.prod(inner, dtype=np.int64)) * itemsize  # bytes of one row of a chunk
    rows = max(1, min(shape[0], CHUNK_BYTES // max(row, 1)))
    n_chunks = max(1, -(-shape[0] // rows))
    chunk_rows_bytes = rows * row * (shape[1] if per_view else 1)  # all views: a shard's unit
    # whole inner chunks per shard, ~SHARD_BYTES or the whole array if smaller
    per_shard = max(1, min(n_chunks, SHARD_BYTES // max(chunk_rows_bytes, 1)))
    return (rows, *inner), (rows * per_shard, *shape[1:])
