"""Zarr v3 store of teacher outputs, fingerprinted, resumable and checked for damage.

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

A write goes to the staging group and replaces the complete one only when every row is
in, so a killed (forced) re-run never loses a finished cache. The writer writes whole
shards only (and the array's tail once the array is full), each followed by a durable
cursor, so no shard is ever rewritten in part and a killed extraction with the same
fingerprint resumes at its last whole shard.

Several processes (torchrun ranks) extract one group together without locks: rank 0
creates or resumes the staging group and shares each array's rows out in ranges cut at
shard boundaries (``prepare``); each rank writes its own range only, keeping its cursors
in its own progress file (``join``), so no two ranks ever write one file; rank 0 checks
that every range is complete, then writes the manifest and promotes the group. A resume,
by any number of ranks or by one process, keeps the whole shards recorded as durable, and
each writer goes on after those that open its range.

Damage is caught twice: the manifest (size and crc32 of every file) makes ``status()``
report it, and the crc32c of every inner chunk and of every shard index makes zarr refuse
a damaged chunk on read. ``status()`` re-reads only the files whose stat changed since
they were last found intact (verified.json; local files: size, mtime, ctime and inode;
object stores: size and ETag, else modification time), so repeated checks of a large
cache read no chunk data. A file modified less than ``RACY_NS`` before its check is
checked again next time: coarse file-system clocks may not have moved its mtime. A chunk
that fails its crc32c when read (damage the manifest and the memo did not see: written
damaged, or rewritten where the stat does not show it) drops the memo and is recorded in
damaged.json, which makes ``status()`` say "corrupt" until the group is rebuilt.

Ownership: mlfd's groups carry a fingerprint and its digest in their attributes (plain
zarr writes neither), and ``foreign`` says why a store is not made of such groups only:
`mlfd clean` removes nothing else.

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
import re
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from ..config import check_codec
from ..errors import CorruptArtifact, MlfdError, StaleCacheError
from ..storage.diskio import writing
from ..storage.fingerprint import changes, digest
from ..storage.staging import StagedDir, set_interrupt_note
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


def _read_only() -> bool:
    from ..storage import staging

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


def _may_record() -> bool:
    """Whether this process may write a group's bookkeeping after a failed read: not a
    command that holds no workdir lock (eval, --dry-run); a torchrun rank other than 0
    may, under rank 0's lock (its only reason to be read-only is promotion, done by then)."""
    return not _read_only() or int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun


def _damaged(d) -> dict[str, str]:
    """The arrays recorded in damaged.json (name -> why), {} if none (or unreadable)."""
    try:
        arrays = json.loads(d.read(DAMAGED))["arrays"]
        return dict(arrays) if isinstance(arrays, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _damage_note(d) -> str | None:
    """Why the group must be rebuilt after a read failed (None: no read failed)."""
    if not d.exists(DAMAGED):
        return None
    arrays = _damaged(d)
    if not arrays:
        return f"{DAMAGED} unreadable"
    name, why = next(iter(arrays.items()))
    return f"array {name} failed to decode when read ({why})"


def record_damage(d, array: str, why: str) -> bool:
    """A chunk of ``array`` failed its checksum when read although the group was checked:
    drop the memo of intact files (the next check reads every byte again) and record the
    array in damaged.json, which keeps status() "corrupt" until a rebuild replaces the
    group (the manifest may match damaged bytes: they were damaged before it was made).
    False where nothing could be recorded: this process may not write (eval, --dry-run),
    or the write failed."""
    if not _may_record():
        return False
    recorded = True
    try:  # a failed write (a full disk) must not hide the corrupt chunk's own error
        d.write_json(DAMAGED, {"arrays": {**_damaged(d), array: why}})
    except (OSError, MlfdError):
        recorded = False
    with contextlib.suppress(OSError, MlfdError):
        d.delete(VERIFIED)
    return recorded


def foreign(d, judge) -> str | None:
    """Why the store (a ``.zarr`` directory of ``stores_under``) is not one of mlfd's;
    None when it is: every file in it lies in a ``<dataset>/<split>`` group whose
    attributes carry a fingerprint and its digest (what mlfd writes, plain zarr does not),
    and ``judge(group, fingerprint)`` (None, or why not) takes each group as its own."""
    if d.is_link():
        return "a symbolic link (mlfd never makes one)"
    groups: set[str] = set()
    for rel in d.listing():
        parts = rel.split("/")
        if len(parts) < 3:  # mlfd writes nothing beside its groups
            return f"{rel} is not in a cache group"
        groups.add("/".join(parts[:2]))
    if not groups:
        return "no cache group in it"
    for g in sorted(groups):
        try:
            attrs = _attrs(d.sub(g))
        except (OSError, ValueError, KeyError, TypeError):
            return f"{g}: no readable zarr.json"
        fp = attrs.get("fingerprint")
        if not isinstance(fp, dict) or attrs.get("fingerprint_digest") != digest(fp):
            return f"{g}: no mlfd fingerprint"
        if why := judge(g, fp):
            return f"{g}: {why}"
    return None


# --------------------------------------------------------------------------- groups


def _shard_rows(arr) -> int:
    return (arr.shards or arr.chunks)[0]


def shard_ranges(n: int, step: int, world: int) -> list[tuple[int, int]]:
    """The [start, stop) rows of each of ``world`` writers of an ``n``-row array with
    ``step`` rows per shard: contiguous, disjoint and complete, cut at multiples of
    ``step`` so that no two writers ever write the same shard file. Whole shards are dealt
    out as evenly as they go, the last range ends with the array's tail shard, and with
    fewer shards than writers some ranges are empty."""
    if n < 0 or step < 1 or world < 1:
        raise ValueError(f"shard_ranges needs n >= 0, step >= 1 and world >= 1, got {n}, "
                         f"{step} and {world}")
    shards = -(-n // step)
    cuts = [min(n, shards * r // world * step) for r in range(world + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _durable_rows(staged, prog: dict, spec: dict) -> dict[str, list[tuple[int, int]]]:
    """The rows a staged write holds durably, per array: [start, stop) intervals, from
    progress.json (one writer) or from its ranks' files (a sharded write; a rank without a
    file of these shares holds what it was given to resume from)."""
    shares = prog.get("shares")
    if shares is None:
        return {k: [(0, int(prog["cursors"][k]))] for k in spec}
    done = {k: [] for k in spec}
    for r in range(int(shares["world"])):
        cursors = {k: int(shares["cursors"][k][r]) for k in spec}
        try:
            mine = json.loads(staged.read(rank_progress(r)))
            if mine["shares"] == shares["id"]:
                cursors = {k: int(mine["cursors"][k]) for k in spec}
        except (OSError, *DECODE_ERRORS):
            pass  # no file (yet) of these shares: the rank resumes where it was given
        for k in spec:
            start, stop = (int(x) for x in shares["ranges"][k][r])
            done[k].append((start, min(cursors[k], stop)))
    return done


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
            self.fs, path = url_to_fs(self.path)
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

    def _inspect(self, reading: bool = False) -> tuple[str, str]:
        """(state, why). ``reading``: for a reader, which damaged.json does not stop: the
        chunks' crc32c refuse exactly the damaged ones, the rest of the group reads."""
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
        if not reading and (note := _damage_note(final)):
            return "corrupt", f"corrupt: {note}"
        problem = _verify(final)  # last: it reads every file changed since its last check
        return ("corrupt", f"corrupt: {problem}") if problem else ("ok", "ok")

    def status(self) -> str:
        """'missing', 'incomplete', 'stale', 'corrupt' or 'ok', of the complete group only."""
        return self._inspect()[0]

    def reason(self) -> str:
        """One line saying why: 'ok', 'missing', 'stale: views 4 → 8', 'corrupt: ...'."""
        return self._inspect()[1]

    def _rebuild_hint(self, why: str, recorded: bool = True) -> str:
        if not recorded:  # damage nothing on disk shows: only --force rewrites the group
            return (f"cache {self.location}: {why}; re-run `mlfd cache --force` to rebuild "
                    "it")
        verb = "build" if why == "missing" else "rebuild"
        return (f"cache {self.location}: {why}; re-run `mlfd cache` (or `mlfd distill`) to "
                f"{verb} it, no --force needed")

    def record_damage(self, array: str, why: str) -> bool:
        """``array`` failed to decode when read: see ``record_damage`` (module level)."""
        return record_damage(self._dir(self.path), array, why)

    def check(self) -> None:
        """Raise a one-line error unless the group is complete, current and intact (by its
        manifest: arrays recorded as damaged by a failed read make status() ask for a
        rebuild, but their undamaged chunks still read)."""
        state, why = self._inspect(reading=True)
        if state == "ok":
            return
        error = {"missing": MlfdError, "corrupt": CorruptArtifact}.get(state, StaleCacheError)
        raise error(self._rebuild_hint(why))

    def _spec(self, arrays: dict[str, tuple[tuple[int, ...], str]]) -> dict:
        return {k: [[int(n) for n in shape], _logical(dtype)]
                for k, (shape, dtype) in arrays.items()}

    def _head(self, spec: dict) -> dict:
        """What a staged write must match to be resumed: fingerprint, arrays and storage."""
        return {"digest": digest(self.fingerprint), "arrays": spec, "storage": self._storage}

    def _note(self) -> None:
        set_interrupt_note(f"cache {self.location}: the next run resumes its extraction at "
                           "the last complete shard")

    def begin(self, arrays: dict[str, tuple[tuple[int, ...], str]],
              restart: bool = False) -> CacheWriter:
        """Write into the staging group: ``arrays`` maps name -> (shape, dtype), a dtype
        being a numpy name or ``"bfloat16"``. A staged write of the same fingerprint,
        codec and arrays is resumed unless ``restart`` (one a sharded extraction left too:
        from the shards its ranks finished)."""
        self._recover()
        spec = self._spec(arrays)
        self._note()
        staged = None if restart else self._reopen(spec)
        if staged is None:
            writer = CacheWriter(self, *self._create(spec), spec, {k: 0 for k in spec})
            writer._save_progress()
            return writer
        g, handles, done, old_world = staged
        cursors = {k: self._keep(k, a, done[k], [(0, a.shape[0])])[0]
                   for k, a in handles.items()}
        writer = CacheWriter(self, g, handles, spec, cursors)
        if old_world:  # the ranks' files described the staging: now this writer's file does
            writer._save_progress()
            self._drop_rank_files(old_world)
        return writer

    def prepare(self, arrays: dict[str, tuple[tuple[int, ...], str]], world: int,
                restart: bool = False) -> dict:
        """Rank 0's part of an extraction by ``world`` processes, before any rank writes:
        create (or resume, as ``begin`` does) the staging group and deal each array's rows
        out in shard-aligned ranges (``shard_ranges``). Returns the shares that every rank
        passes to ``join``: the ranges, where each resumes, and an id its progress file
        carries. The ranges may differ from those of the write it resumes: a rank resumes
        after the whole shards at the start of its range that are already durable."""
        self._recover()
        spec = self._spec(arrays)
        self._note()
        staged = None if restart else self._reopen(spec)
        if staged is None:
            g, handles = self._create(spec)
            done, old_world = {k: [] for k in spec}, 0
        else:
            g, handles, done, old_world = staged
        ranges = {k: [list(r) for r in shard_ranges(a.shape[0], _shard_rows(a), world)]
                  for k, a in handles.items()}
        shares = {"id": uuid.uuid4().hex, "world": world, "ranges": ranges,
                  "cursors": {k: self._keep(k, a, done[k], ranges[k])
                              for k, a in handles.items()}}
        with _writing(self):
            self._dir(self.staging).write_json(PROGRESS, {**self._head(spec), "shares": shares})
        # only now: until the new shares were written, the old ranks' files said what is done
        self._drop_rank_files(old_world)
        return shares

    def join(self, arrays: dict[str, tuple[tuple[int, ...], str]], shares: dict,
             rank: int) -> CacheWriter:
        """The writer of rank ``rank`` in the staging group whose rows ``prepare`` shared out (every
        rank, rank 0 too, once prepare returned): it writes its own range of each array
        only, and keeps its cursors in its own progress file, so no two ranks ever write
        the same file. Its ``close`` is rank 0's alone, with every rank's ``held()``."""
        spec = self._spec(arrays)
        self._note()
        g = _zarr().open_group(store=self._dir(self.staging).zarr_store(), mode="r+")
        handles = {k: g[k] for k in spec}
        return CacheWriter(self, g, handles, spec,
                           {k: int(shares["cursors"][k][rank]) for k in spec},
                           rows={k: tuple(shares["ranges"][k][rank]) for k in spec},
                           shared=(rank, shares))

    def _reopen(self, spec: dict) -> tuple | None:
        """(zarr group, arrays, the rows durable per array as [start, stop) intervals, the
        world size of a sharded write's rank files or 0) of a staged write of the same
        inputs; None when there is nothing usable to resume."""
        staged = self._dir(self.staging)
        try:
            prog = json.loads(staged.read(PROGRESS))
            if any(prog.get(k) != v for k, v in self._head(spec).items()):
                return None
            g = _zarr().open_group(store=staged.zarr_store(), mode="r+")
            handles = {k: g[k] for k in spec}
            done = _durable_rows(staged, prog, spec)
            world = int(prog["shares"]["world"]) if "shares" in prog else 0
        except (OSError, *DECODE_ERRORS):
            return None  # nothing usable staged: start afresh
        return g, handles, done, world

    def _keep(self, name: str, arr, done: list, ranges: list) -> list[int]:
        """Keep the shards of ``arr`` whose rows are all durable (in one of the ``done``
        intervals), delete the others, and return where each of ``ranges`` resumes: after
        the kept shards its start is followed by. Only whole shards count as written (a
        cursor is defensively rounded down), and zarr reads a shard before writing into
        it: one a kill tore past a cursor would fail that read, so it goes (it held
        nothing durable)."""
        n, step = arr.shape[0], _shard_rows(arr)
        kept = set()
        for start, stop in done:
            i = -(-int(start) // step)
            while i * step < n and min((i + 1) * step, n) <= stop:
                kept.add(i)
                i += 1
        if done and len(kept) < -(-n // step):  # (nothing done: a new group, no files)
            self._dir(self.staging).drop_shards(name, kept)
        cursors = []
        for lo, hi in ranges:
            at = lo
            while at < hi and at // step in kept:
                at = min(at + step, hi)
            cursors.append(at)
        return cursors

    def _drop_rank_files(self, world: int) -> None:
        staged = self._dir(self.staging)
        for r in range(world):
            staged.delete(rank_progress(r))

    def _create(self, spec: dict) -> tuple:
        """A new, empty staging group: (zarr group, arrays)."""
        with _writing(self):
            return self._create_in(spec)

    def _create_in(self, spec: dict) -> tuple:
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
            chunks, shards = layout(shape, dtype.itemsize)
            handles[name] = g.create_array(
                name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                compressors=_codecs(self.codec, self.clevel), fill_value=0,
                attributes={"dtype": logical})
        return g, handles

    def _promote(self, drop: tuple[str, ...] = ()) -> None:
        """The staged group in place of the final one, without its resume bookkeeping
        (progress.json, and ``drop``: the ranks' progress files)."""
        if self.fs is None:
            StagedDir(self.path).promote(drop=(PROGRESS, *drop))
        else:
            for rel in (PROGRESS, *drop):
                self._dir(self.staging).delete(rel)
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

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every array (from the group's metadata: no integrity read)."""
        return {k: tuple(int(n) for n in v[0]) for k, v in self._stored_arrays().items()}

    def load(self, names: list[str] | None = None,
             rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Whole arrays in memory: random batches from zarr chunks would be ~1000x slower.
        bfloat16 arrays come as their uint16 bit patterns: see ``tensors`` / ``to_tensor``.
        With ``rows`` (start, stop): those rows of each array only."""
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
                out[k] = g[k][...] if rows is None else g[k][rows[0]:rows[1]]
            except DECODE_ERRORS as e:  # damage check() did not see: still one clear line
                recorded = self.record_damage(k, type(e).__name__)  # so a re-run rebuilds
                raise CorruptArtifact(self._rebuild_hint(
                    f"corrupt: array {k} failed to decode ({type(e).__name__})", recorded)) from e
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


def _writing(group: CacheGroup):
    """Failed writes into the staging group (a full disk: zarr's OSError names no file)
    as one FilesystemError naming it."""
    fs = group.fs
    return writing(group.staging if fs is None else fs.unstrip_protocol(str(group.staging)))


class CacheWriter:
    """Rows in order per array; only whole shards are written (the last one once the array
    is full), each followed by a durable cursor, so a resumed write starts on a shard
    boundary and never rewrites part of a shard that a kill may have torn.

    A rank of a sharded extraction (``CacheGroup.join``) writes the same way within its own
    shard-aligned range of each array (``rows``), ending with the range's last shard."""

    def __init__(self, group: CacheGroup, zgroup, handles: dict, spec: dict,
                 cursors: dict[str, int], rows: dict[str, tuple[int, int]] | None = None,
                 shared: tuple[int, dict] | None = None):
        self.group, self.zgroup, self.handles, self._spec = group, zgroup, handles, spec
        self._durable = dict(cursors)  # rows written and recorded in the progress file
        self._next = dict(cursors)  # first row not yet held (durable + pending)
        self._pending: dict[str, list[np.ndarray]] = {k: [] for k in handles}
        self._pos = {k: 0 for k in handles}  # row index of the caller's next append
        self._rows = rows or {k: (0, a.shape[0]) for k, a in handles.items()}
        self._shared = shared  # (rank, shares) in a sharded extraction; None: the only writer

    def cursor(self, name: str) -> int:
        """Rows of ``name`` already durable: production may resume at any row up to this."""
        return self._durable[name]

    def rows(self, name: str) -> tuple[int, int]:
        """The [start, stop) rows of ``name`` this writer writes: all, or its rank's range."""
        return self._rows[name]

    def held(self) -> dict[str, int]:
        """Where each array's durable rows end: a rank's report to rank 0's ``close``."""
        return dict(self._durable)

    def append(self, name: str, values, start: int | None = None) -> None:
        """Rows of ``name`` from row ``start`` (default: where the previous append ended,
        0 at first). Rows the writer already holds are dropped, so a caller resuming at
        the minimum cursor of several arrays rewrites nothing; so are rows past a rank's
        range (another rank's). Float values are converted to the array's dtype
        (bfloat16: rounded as torch rounds)."""
        arr = self.handles[name]
        values = _to_stored(values, self._spec[name][1], arr.dtype)
        pos = self._pos[name] if start is None else int(start)
        stop = self._rows[name][1]
        past_range = self._shared is not None and self._next[name] == stop
        if pos > self._next[name] and not past_range:
            raise MlfdError(f"cache array {name}: rows from {pos} given, row {self._next[name]} "
                            "is missing")
        if pos + len(values) > arr.shape[0]:
            raise MlfdError(f"cache array {name}: rows up to {pos + len(values)} given, it has "
                            f"{arr.shape[0]}")
        self._pos[name] = pos + len(values)
        new = values[max(0, self._next[name] - pos):max(0, stop - pos)]
        if len(new):
            self._pending[name].append(new)
            self._next[name] += len(new)
            self._flush(name)

    def _flush(self, name: str) -> None:
        arr = self.handles[name]
        start, stop = self._durable[name], self._next[name]
        if stop < self._rows[name][1]:  # whole shards only; the last one once it is full
            step = _shard_rows(arr)
            stop = start + (stop - start) // step * step
        if stop == start:
            return
        block = np.concatenate(self._pending[name])
        with _writing(self.group):
            arr[start:stop] = block[:stop - start]
        self._pending[name] = [block[stop - start:]] if stop < self._next[name] else []
        self._durable[name] = stop
        self._save_progress()

    def _save_progress(self) -> None:
        with _writing(self.group):
            self._write_progress()

    def _write_progress(self) -> None:
        staged = self.group._dir(self.group.staging)
        if self._shared is None:
            staged.write_json(PROGRESS, {**self.group._head(self._spec), "cursors": self._durable})
            return
        rank, shares = self._shared  # the rank's own file: no two ranks write one file
        staged.write_json(rank_progress(rank), {"shares": shares["id"], "cursors": self._durable})

    def close(self, held: list[dict[str, int]] | None = None) -> None:
        """Check every row is in, write the manifest (last), then promote the group.

        In a sharded extraction only rank 0 closes, once every rank finished, with their
        ``held()`` in rank order: a range a rank did not complete is a one-line error."""
        drop: tuple[str, ...] = ()
        if self._shared is None:
            for name, arr in self.handles.items():
                if self._next[name] != arr.shape[0]:
                    raise MlfdError(f"cache array {name}: wrote {self._next[name]} of "
                                    f"{arr.shape[0]} rows")
        else:
            shares = self._shared[1]
            world = shares["world"]
            if held is None or len(held) != world:
                raise MlfdError(f"cache {self.group.location}: {len(held or [])} of {world} "
                                "ranks reported their rows")
            for r, cursors in enumerate(held):
                for name in self.handles:
                    start, stop = shares["ranges"][name][r]
                    at = cursors.get(name, start)
                    if at < stop:
                        raise MlfdError(
                            f"cache {self.group.location}: rows {at}–{stop} of array {name} "
                            f"are missing (rank {r} of {world} wrote {start}–{at} of its "
                            f"{start}–{stop}); re-run to resume the extraction")
            drop = tuple(rank_progress(r) for r in range(world))
        with _writing(self.group):
            self.zgroup.attrs["complete"] = True
            staged = self.group._dir(self.group.staging)
            # the id makes every write's manifest unique: a copy-promotion can tell it
            # finished
            staged.write_json(MANIFEST, {"id": uuid.uuid4().hex, "files": _manifest(staged)})
            self.group._promote(drop)
        set_interrupt_note(None)
