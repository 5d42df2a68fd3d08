"""Zarr v3 store of teacher outputs, fingerprinted, resumable and checked for damage.

Layout: one group per (dataset, split) inside a stage's ``.zarr`` store; arrays have the
sample index as the first axis and the view id as the second; ``labels`` beside them.
Arrays are sharded (zarr v3 ``sharding_indexed``): ~1 MiB inner chunks, each compressed
(Blosc zstd or lz4 with byte shuffle, or not at all) and followed by its crc32c, are packed
into shard files of ~64 MiB along the sample axis, so a million-row cache is some hundreds
of files, not millions. The group's attributes hold the fingerprint (a dict of everything
the values depend on, plus its digest), the array specs with their logical dtypes
(``bfloat16`` is stored as its uint16 bit pattern: numpy has no bfloat16), the codec and a
``complete`` flag.

    <parent>/<name>/              the last COMPLETE group, with manifest.json (and
                                  verified.json: which files status() already checked)
    <parent>/.<name>.partial/     the extraction in progress, with progress.json
    <parent>/.<name>.old/         local disks only, for an instant while a group is promoted
    <name>/c/<shard>/0/...        a shard file: inner chunks, then their index (+ crc32c)

A write goes to the staging group and replaces the complete one only when every row is
in, so a killed (forced) re-run never loses a finished cache. The writer writes whole
shards only (and the array's tail once the array is full), each followed by a durable
cursor, so no shard is ever rewritten in part and a killed extraction with the same
fingerprint resumes at its last whole shard.

Damage is caught twice: the manifest (size and crc32 of every file) makes ``status()``
report it, and the crc32c of every inner chunk and of every shard index makes zarr refuse
a damaged chunk on read. ``status()`` re-reads only the files whose stat changed since
they were last found intact (verified.json; local files: size, mtime, ctime and inode;
object stores: size and ETag, else modification time), so repeated checks of a large
cache read no chunk data. A file modified less than ``RACY_NS`` before its check is
checked again next time: coarse file-system clocks may not have moved its mtime.

Locations: a local path, or any fsspec URL (``file://`` URLs are local paths;
``memory://``, ``s3://`` with s3fs, ...). Object stores have no atomic rename, so there a
group counts only when its ``complete`` attribute is set AND its manifest exists, and the
manifest is always written last. Promotion there is copy-then-delete: once the staging
group holds its manifest (its mark that promotion may start), the final group's manifest
is deleted first, then its files; the staging files are copied, its manifest last, and
the staging group is deleted. A kill at any point leaves a final group without a manifest
(never "ok") beside a complete staging group, whose promotion the next run finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from ..engine.fingerprint import changes, digest
from ..engine.staging import StagedDir, set_interrupt_note
from ..errors import CorruptArtifact, MlfdError, StaleCacheError

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 1 << 20  # ~1 MiB inner chunks along the sample axis (the unit zarr decodes)
SHARD_BYTES = 64 << 20  # ~64 MiB shard files (the unit written, resumed and listed)
FORMAT = 3  # 3: sharded arrays; 2: staging, manifest, per-chunk crc32c. Others are rebuilt.
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
VERIFIED = "verified.json"
BOOKKEEPING = (MANIFEST, PROGRESS, VERIFIED)  # beside the arrays, never in the manifest
CODECS = ("zstd", "lz4", "none")
DTYPES = ("float16", "bfloat16", "float32")  # what cache.dtype may be
STORED_AS = {"bfloat16": "uint16"}  # logical dtype -> dtype of the zarr array
# A file whose mtime is this recent when it is checked may change again within the same
# clock tick without its mtime moving: it is re-read next time rather than trusted.
RACY_NS = 2_000_000_000
# What zarr/numcodecs raise for damaged bytes: a crc32c mismatch or bad JSON is a
# ValueError, an undecodable blosc frame a RuntimeError, a vanished array a KeyError.
DECODE_ERRORS = (ValueError, RuntimeError, KeyError, TypeError)


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


def check_codec(codec: str, clevel) -> None:
    if codec not in CODECS:
        raise MlfdError(f"cache.codec {codec!r}: choose {', '.join(CODECS)}")
    if isinstance(clevel, bool) or not isinstance(clevel, int) or not 0 <= clevel <= 9:
        raise MlfdError(f"cache.clevel must be an integer from 0 to 9, got {clevel!r}")


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
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu()
        values = (values.float() if str(values.dtype) == "torch.bfloat16" else values).numpy()
    return np.asarray(values, dtype=stored)


# --------------------------------------------------------------------------- locations


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
    fs, path = _url_to_fs(uri)
    return Path(path) if fs is None else uri.rstrip("/")


def join(location: Path | str, *parts: str) -> Path | str:
    """``location / part / ...`` for a local path or a URL."""
    if isinstance(location, str):
        return "/".join([location.rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


def _url_to_fs(url: str):
    """(fsspec filesystem, path on it), or (None, path) for the local disk."""
    if why := check_uri(url):
        raise MlfdError(f"cache location {url}: {why}")
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, path = url_to_fs(url)
    return (None, path) if isinstance(fs, LocalFileSystem) else (fs, path)


@dataclass
class _Stat:
    size: int
    key: list | None  # what must be unchanged for an earlier check to stand (None: nothing)
    racy: bool = False  # modified too recently for the key to prove anything yet


def _is_bookkeeping(rel: str) -> bool:
    return rel.removesuffix(".tmp") in BOOKKEEPING


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
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, self.path / rel)

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

    def zarr_store(self, read_only: bool = False):
        return str(self.path)  # zarr opens a LocalStore

    def drop_shards(self, array: str, first: int) -> None:
        grid = self.path / array / "c"
        for p in grid.iterdir() if grid.is_dir() else ():
            if p.name.isdigit() and int(p.name) >= first:
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

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import FsspecStore

        # from_mapper wraps a synchronous filesystem (memory://, ...) for zarr's async API
        return FsspecStore.from_mapper(self.fs.get_mapper(self.path), read_only=read_only)

    def drop_shards(self, array: str, first: int) -> None:
        prefix = f"{array}/c/"
        for rel in self._find():
            if rel.startswith(prefix) and int(rel[len(prefix):].split("/")[0]) >= first:
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


def _read_only() -> bool:
    from ..engine import staging

    return staging._READ_ONLY["on"]


# --------------------------------------------------------------------------- integrity


def describe_difference(stored: dict, wanted: dict) -> str:
    """``"dtype float16 → float32; views 4 → 8"``: the keys that differ."""
    return changes(stored, wanted, limit=8) or "fingerprint digest differs"


def _as_dir(root) -> _LocalDir | _RemoteDir:
    return root if isinstance(root, (_LocalDir, _RemoteDir)) else _LocalDir(root)


def _attrs(root) -> dict:
    """The group's attributes from its zarr.json; ValueError/KeyError/TypeError if damaged."""
    attrs = json.loads(_as_dir(root).read("zarr.json"))["attributes"]
    if not isinstance(attrs, dict):
        raise TypeError("attributes are not a mapping")
    return attrs


def _file_crc(d, rel: str) -> int:
    crc = 0
    with d.open(rel) as f:  # in blocks: shards are tens of MiB
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _manifest(root) -> dict[str, list[int]]:
    d = _as_dir(root)
    return {rel: [st.size, _file_crc(d, rel)] for rel, st in d.files().items()}


def _memo(d, tag: int) -> dict:
    """Files found intact earlier (rel -> stat key), if recorded for this very manifest."""
    try:
        memo = json.loads(d.read(VERIFIED))
        return memo["files"] if memo["manifest"] == tag and isinstance(memo["files"], dict) \
            else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _verify(root) -> str | None:
    """What differs from the manifest written at close (None: every file intact). Files
    whose stat is as when they were last found intact are not read again."""
    d = _as_dir(root)
    try:
        raw = d.read(MANIFEST)
        want = {rel: (int(size), int(crc)) for rel, (size, crc)
                in json.loads(raw)["files"].items()}
    except FileNotFoundError:
        return f"{MANIFEST} missing"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} unreadable"
    have = d.files(time.time_ns())
    tag = zlib.crc32(raw)
    memo, checked = _memo(d, tag), {}
    for rel, (size, crc) in want.items():
        st = have.get(rel)
        if st is None:
            return f"{rel} missing"
        if st.size != size:
            return f"{rel} size mismatch ({st.size} ≠ {size} bytes)"
        if st.key is None or memo.get(rel) != st.key:
            if _file_crc(d, rel) != crc:
                return f"{rel} checksum mismatch"
            if st.key is None or st.racy:
                continue
        checked[rel] = st.key
    extra = sorted(set(have) - set(want))
    if extra:
        return f"{extra[0]} not in manifest"
    if checked != memo and not _read_only():  # read-only runs (eval, --dry-run) write nothing
        with contextlib.suppress(OSError):  # only a memo: a failed write costs a re-read
            d.write_json(VERIFIED, {"manifest": tag, "files": checked})
    return None


# --------------------------------------------------------------------------- groups


def _shard_rows(arr) -> int:
    return (arr.shards or arr.chunks)[0]


@dataclass
class CacheGroup:
    """One (dataset, split) group: written batch by batch (resumably), read whole.

    ``path`` is a local path or an fsspec URL; for a URL it becomes the path on ``fs``."""

    path: Path
    fingerprint: dict
    codec: str = "zstd"
    clevel: int = 5
    fs: object = field(default=None, repr=False)

    def __post_init__(self):
        check_codec(self.codec, self.clevel)
        self._url = None
        if self.fs is None and isinstance(self.path, str) and "://" in self.path:
            self.fs, path = _url_to_fs(self.path)
            if self.fs is not None:
                self._url = self.path.rstrip("/")  # messages name it as it was given
            self.path = Path(path) if self.fs is None else PurePosixPath(path)
        elif self.fs is None:
            self.path = Path(self.path)
        else:
            self.path = PurePosixPath(self.path)

    @property
    def location(self) -> str:
        """The group's path or URL, for messages."""
        if self.fs is None:
            return str(self.path)
        return self._url or self.fs.unstrip_protocol(str(self.path))

    @property
    def staging(self) -> Path:
        return self.path.parent / f".{self.path.name}.partial"

    def _dir(self, path):
        return _LocalDir(path) if self.fs is None else _RemoteDir(self.fs, str(path))

    @property
    def _storage(self) -> dict:
        return {"codec": self.codec, "clevel": self.clevel}

    def exists(self) -> bool:
        return self._dir(self.path).exists("zarr.json")

    def _recover(self) -> None:
        if self.fs is None:
            StagedDir(self.path).recover()
        elif not _read_only() and self._dir(self.staging).exists(MANIFEST):
            self._copy_promote()  # a promotion a kill interrupted

    def _inspect(self) -> tuple[str, str]:
        self._recover()
        if not self.exists():
            return "missing", "missing"
        final = self._dir(self.path)
        try:
            attrs = _attrs(final)
        except (OSError, ValueError, KeyError, TypeError):
            return "corrupt", "corrupt: zarr.json unreadable"
        if not attrs.get("complete"):
            return "incomplete", "incomplete (interrupted)"
        if attrs.get("format", 1) != FORMAT:
            return "stale", f"stale: cache format {attrs.get('format', 1)} → {FORMAT}"
        if attrs.get("fingerprint_digest") != digest(self.fingerprint):
            stored = attrs.get("fingerprint")
            return "stale", "stale: " + describe_difference(
                stored if isinstance(stored, dict) else {}, self.fingerprint)
        if self.fs is not None and not final.exists(MANIFEST) \
                and self._dir(self.staging).exists(MANIFEST):
            return "incomplete", "incomplete (being copied into place)"
        problem = _verify(final)  # last: it reads every file changed since its last check
        return ("corrupt", f"corrupt: {problem}") if problem else ("ok", "ok")

    def status(self) -> str:
        """'missing', 'incomplete', 'stale', 'corrupt' or 'ok', of the complete group only."""
        return self._inspect()[0]

    def reason(self) -> str:
        """One line saying why: 'ok', 'missing', 'stale: views 4 → 8', 'corrupt: ...'."""
        return self._inspect()[1]

    def _rebuild_hint(self, why: str) -> str:
        verb = "build" if why == "missing" else "rebuild"
        return (f"cache {self.location}: {why}; re-run `mlfd cache` (or `mlfd distill`) to "
                f"{verb} it, no --force needed")

    def check(self) -> None:
        """Raise a one-line error unless the group is complete, current and intact."""
        state, why = self._inspect()
        if state == "ok":
            return
        error = {"missing": MlfdError, "corrupt": CorruptArtifact}.get(state, StaleCacheError)
        raise error(self._rebuild_hint(why))

    def begin(self, arrays: dict[str, tuple[tuple[int, ...], str]],
              restart: bool = False) -> CacheWriter:
        """Write into the staging group: ``arrays`` maps name -> (shape, dtype), a dtype
        being a numpy name or ``"bfloat16"``. A staged write of the same fingerprint,
        codec and arrays is resumed unless ``restart``."""
        self._recover()
        spec = {k: [[int(n) for n in shape], _logical(dtype)]
                for k, (shape, dtype) in arrays.items()}
        set_interrupt_note(f"cache {self.location}: the next run resumes its extraction at "
                           "the last complete shard")
        return (None if restart else self._resume(spec)) or self._fresh(spec)

    def _resume(self, spec: dict) -> CacheWriter | None:
        staged = self._dir(self.staging)
        try:
            prog = json.loads(staged.read(PROGRESS))
            if prog["digest"] != digest(self.fingerprint) or prog["arrays"] != spec \
                    or prog.get("storage") != self._storage:
                return None
            g = _zarr().open_group(store=staged.zarr_store(), mode="r+")
            handles = {k: g[k] for k in spec}
            cursors = {k: int(prog["cursors"][k]) for k in spec}
        except (OSError, *DECODE_ERRORS):
            return None  # nothing usable staged: start afresh
        for k, a in handles.items():
            n, step = a.shape[0], _shard_rows(a)
            if cursors[k] < n:  # defensive: only whole shards count as written
                cursors[k] = cursors[k] // step * step
                # zarr reads a shard before writing into it: one a kill tore past the
                # cursor would fail that read, so it goes (it held nothing durable).
                staged.drop_shards(k, cursors[k] // step)
            cursors[k] = min(cursors[k], n)
        return CacheWriter(self, g, handles, spec, cursors)

    def _fresh(self, spec: dict) -> CacheWriter:
        staged = self._dir(self.staging)
        staged.remove()
        if self.fs is None:
            self.staging.parent.mkdir(parents=True, exist_ok=True)
        g = _zarr().open_group(store=staged.zarr_store(), mode="w")
        g.attrs.update({"complete": False, "format": FORMAT, "fingerprint": self.fingerprint,
                        "fingerprint_digest": digest(self.fingerprint), "arrays": spec,
                        "storage": self._storage})
        handles = {}
        for name, (shape, logical) in spec.items():
            dtype = np.dtype(STORED_AS.get(logical, logical))
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            rows = max(1, min(shape[0], CHUNK_BYTES // max(row, 1)))
            chunks = max(1, -(-shape[0] // rows))
            # whole inner chunks per shard, ~SHARD_BYTES or the whole array if smaller
            per_shard = max(1, min(chunks, SHARD_BYTES // max(rows * row, 1)))
            handles[name] = g.create_array(
                name, shape=shape, chunks=(rows, *shape[1:]),
                shards=(rows * per_shard, *shape[1:]), dtype=dtype,
                compressors=_codecs(self.codec, self.clevel), fill_value=0,
                attributes={"dtype": logical})
        writer = CacheWriter(self, g, handles, spec, {k: 0 for k in spec})
        writer._save_progress()
        return writer

    def _promote(self) -> None:
        if self.fs is None:
            StagedDir(self.path).promote(drop=(PROGRESS,))
        else:
            self._dir(self.staging).delete(PROGRESS)
            self._copy_promote()

    def _copy_promote(self) -> None:
        """Promotion without rename (object stores): see the module docstring. Idempotent:
        a run that finds the staged manifest does it all again."""
        final, staged = self._dir(self.path), self._dir(self.staging)
        manifest = staged.read(MANIFEST)
        # The manifest is unique per write (its id): equal means this copy already finished.
        done = final.exists(MANIFEST) and final.read(MANIFEST) == manifest
        if not done:
            final.delete(MANIFEST)  # first: from here on the old group no longer counts
            final.remove()
            for rel in staged.files():
                staged.copy_to(rel, final)
            staged.copy_to(MANIFEST, final)  # last: now the new group counts
        staged.remove()

    def _stored_arrays(self) -> dict[str, list]:
        try:
            arrays = _attrs(self._dir(self.path))["arrays"]
            if isinstance(arrays, dict):
                return arrays
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.check()  # raises the one-line reason (missing, corrupt, ...)
        raise CorruptArtifact(self._rebuild_hint("corrupt: zarr.json has no array specs"))

    def dtypes(self) -> dict[str, str]:
        """The logical dtype of every array (a ``bfloat16`` array loads as uint16)."""
        return {k: v[1] for k, v in self._stored_arrays().items()}

    def load(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Whole arrays in memory: random batches from zarr chunks would be ~1000x slower.
        bfloat16 arrays come as their uint16 bit patterns: see ``tensors`` / ``to_tensor``."""
        self.check()
        stored = self._stored_arrays()
        names = list(names or stored)
        if unknown := [k for k in names if k not in stored]:
            raise MlfdError(f"cache {self.location} has no array {unknown[0]!r} "
                            f"(has {', '.join(stored)})")
        out = {}
        g = _zarr().open_group(store=self.zarr_store(), mode="r")
        for k in names:
            try:
                out[k] = g[k][...]
            except DECODE_ERRORS as e:  # damaged after check(): still one clear line
                raise CorruptArtifact(self._rebuild_hint(
                    f"corrupt: array {k} failed to decode ({type(e).__name__})")) from e
        return out

    def tensors(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Arrays from ``load()`` as tensors of their logical dtypes (memory shared)."""
        dtypes = self.dtypes()
        return {k: to_tensor(v, dtypes.get(k, v.dtype.name)) for k, v in arrays.items()}

    def zarr_store(self, read_only: bool = True):
        """The zarr store (or local path) of the complete group, unchecked: for readers that
        check it themselves or read metadata only."""
        return self._dir(self.path).zarr_store(read_only=read_only)

    def open_read(self):
        """The checked, complete group opened read-only (zarr arrays read lazily by slice)."""
        self.check()
        return _zarr().open_group(store=self.zarr_store(), mode="r")

    def nbytes(self) -> int:
        return self._dir(self.path).nbytes()


class CacheWriter:
    """Rows in order per array; only whole shards are written (the last one once the array
    is full), each followed by a durable cursor, so a resumed write starts on a shard
    boundary and never rewrites part of a shard that a kill may have torn."""

    def __init__(self, group: CacheGroup, zgroup, handles: dict, spec: dict,
                 cursors: dict[str, int]):
        self.group, self.zgroup, self.handles, self._spec = group, zgroup, handles, spec
        self._durable = dict(cursors)  # rows written and recorded in the progress file
        self._next = dict(cursors)  # first row not yet held (durable + pending)
        self._pending: dict[str, list[np.ndarray]] = {k: [] for k in handles}
        self._pos = {k: 0 for k in handles}  # row index of the caller's next append

    def cursor(self, name: str) -> int:
        """Rows of ``name`` already durable: production may resume at any row up to this."""
        return self._durable[name]

    def append(self, name: str, values, start: int | None = None) -> None:
        """Rows of ``name`` from row ``start`` (default: where the previous append ended,
        0 at first). Rows the writer already holds are dropped, so a caller resuming at
        the minimum cursor of several arrays rewrites nothing. Float values are converted
        to the array's dtype (bfloat16: rounded as torch rounds)."""
        arr = self.handles[name]
        values = _to_stored(values, self._spec[name][1], arr.dtype)
        pos = self._pos[name] if start is None else int(start)
        if pos > self._next[name]:
            raise MlfdError(f"cache array {name}: rows from {pos} given, row {self._next[name]} "
                            "is missing")
        if pos + len(values) > arr.shape[0]:
            raise MlfdError(f"cache array {name}: rows up to {pos + len(values)} given, it has "
                            f"{arr.shape[0]}")
        self._pos[name] = pos + len(values)
        new = values[self._next[name] - pos:]
        if len(new):
            self._pending[name].append(new)
            self._next[name] += len(new)
            self._flush(name)

    def _flush(self, name: str) -> None:
        arr = self.handles[name]
        start, stop = self._durable[name], self._next[name]
        if stop < arr.shape[0]:  # whole shards only; the tail shard once the array is full
            step = _shard_rows(arr)
            stop = start + (stop - start) // step * step
        if stop == start:
            return
        block = np.concatenate(self._pending[name])
        arr[start:stop] = block[:stop - start]
        self._pending[name] = [block[stop - start:]] if stop < self._next[name] else []
        self._durable[name] = stop
        self._save_progress()

    def _save_progress(self) -> None:
        self.group._dir(self.group.staging).write_json(PROGRESS, {
            "digest": digest(self.group.fingerprint), "arrays": self._spec,
            "storage": self.group._storage, "cursors": self._durable})

    def close(self) -> None:
        """Check every row is in, write the manifest (last), then promote the group."""
        for name, arr in self.handles.items():
            if self._next[name] != arr.shape[0]:
                raise MlfdError(f"cache array {name}: wrote {self._next[name]} of {arr.shape[0]} rows")
        self.zgroup.attrs["complete"] = True
        staged = self.group._dir(self.group.staging)
        # the id makes every write's manifest unique: a copy-promotion can tell it finished
        staged.write_json(MANIFEST, {"id": uuid.uuid4().hex, "files": _manifest(staged)})
        self.group._promote()
        set_interrupt_note(None)
