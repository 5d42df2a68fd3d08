"""Zarr v3 store of teacher outputs, fingerprinted, resumable and checked for damage.

Layout: one group per (dataset, split) inside a stage's ``.zarr`` directory; arrays
have the sample index as the first axis and the view id as the second; ``labels``
beside them. The group's attributes hold the fingerprint (a dict of everything the
values depend on, plus its digest), the array specs and a ``complete`` flag.

    <parent>/<name>/             the last COMPLETE group, with manifest.json
    <parent>/.<name>.partial/    the extraction in progress, with progress.json
    <parent>/.<name>.old/        only for an instant while a finished group is promoted

A write goes to the staging group and replaces the complete one only when every row is
in, so a killed (forced) re-run never loses a finished cache; a killed extraction with
the same fingerprint resumes from its last whole chunk. Damage is caught twice: the
manifest (size and crc32 of every file) makes ``status()`` report it, and a crc32c codec
on every chunk makes zarr refuse a damaged chunk on read.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.fingerprint import changes, digest
from ..engine.staging import StagedDir, set_interrupt_note
from ..errors import CorruptArtifact, MlfdError, StaleCacheError

CHUNK_BYTES = 1 << 20  # ~1 MiB chunks along the sample axis
FORMAT = 2  # 2: staging, manifest and per-chunk crc32c; groups without it are rebuilt
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
# What zarr/numcodecs raise for damaged bytes: a crc32c mismatch or bad JSON is a
# ValueError, an undecodable blosc frame a RuntimeError, a vanished array a KeyError.
DECODE_ERRORS = (ValueError, RuntimeError, KeyError, TypeError)


def _zarr():
    import zarr  # imported lazily: CLI start-up stays fast

    return zarr


def _codecs():
    from zarr.codecs import BloscCodec, Crc32cCodec

    # Byte shuffle groups the high bytes of fp16/fp32 values: zstd then finds the redundancy.
    # crc32c over the compressed bytes: zarr verifies each chunk as it reads it.
    return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()]


def describe_difference(stored: dict, wanted: dict) -> str:
    """``"dtype float16 → float32; views 4 → 8"``: the keys that differ."""
    return changes(stored, wanted, limit=8) or "fingerprint digest differs"


def _write_json(path: Path, obj) -> None:
    """Write then rename: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _attrs(root: Path) -> dict:
    """The group's attributes from its zarr.json; ValueError/KeyError/TypeError if damaged."""
    attrs = json.loads((root / "zarr.json").read_text())["attributes"]
    if not isinstance(attrs, dict):
        raise TypeError("attributes are not a mapping")
    return attrs


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, PROGRESS)}


def _manifest(root: Path) -> dict[str, list[int]]:
    return {rel: [p.stat().st_size, zlib.crc32(p.read_bytes())] for rel, p in _files(root).items()}


def _verify(root: Path) -> str | None:
    """What differs from the manifest written at close (None: every file intact)."""
    try:
        want = {rel: (int(size), int(crc)) for rel, (size, crc)
                in json.loads((root / MANIFEST).read_text())["files"].items()}
    except FileNotFoundError:
        return f"{MANIFEST} missing"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} unreadable"
    have = _files(root)
    for rel, (size, crc) in want.items():
        if rel not in have:
            return f"{rel} missing"
        if (n := have[rel].stat().st_size) != size:
            return f"{rel} size mismatch ({n} ≠ {size} bytes)"
        if zlib.crc32(have[rel].read_bytes()) != crc:
            return f"{rel} checksum mismatch"
    extra = sorted(set(have) - set(want))
    return f"{extra[0]} not in manifest" if extra else None


@dataclass
class CacheGroup:
    """One (dataset, split) group: written batch by batch (resumably), read whole."""

    path: Path
    fingerprint: dict

    @property
    def _dirs(self) -> StagedDir:
        return StagedDir(self.path)

    @property
    def staging(self) -> Path:
        return self._dirs.staging

    def exists(self) -> bool:
        return (self.path / "zarr.json").exists()

    def _recover(self) -> None:
        self._dirs.recover()

    def _inspect(self) -> tuple[str, str]:
        self._recover()
        if not self.exists():
            return "missing", "missing"
        try:
            attrs = _attrs(self.path)
        except (ValueError, KeyError, TypeError):
            return "corrupt", "corrupt: zarr.json unreadable"
        if not attrs.get("complete"):
            return "incomplete", "incomplete (interrupted)"
        if attrs.get("format", 1) != FORMAT:
            return "stale", f"stale: cache format {attrs.get('format', 1)} → {FORMAT}"
        if attrs.get("fingerprint_digest") != digest(self.fingerprint):
            stored = attrs.get("fingerprint")
            return "stale", "stale: " + describe_difference(
                stored if isinstance(stored, dict) else {}, self.fingerprint)
        problem = _verify(self.path)  # last: it reads every byte
        return ("corrupt", f"corrupt: {problem}") if problem else ("ok", "ok")

    def status(self) -> str:
        """'missing', 'incomplete', 'stale', 'corrupt' or 'ok', of the complete group only."""
        return self._inspect()[0]

    def reason(self) -> str:
        """One line saying why: 'ok', 'missing', 'stale: views 4 → 8', 'corrupt: ...'."""
        return self._inspect()[1]

    def _rebuild_hint(self, why: str) -> str:
        verb = "build" if why == "missing" else "rebuild"
        return (f"cache {self.path}: {why}; re-run `mlfd cache` (or `mlfd distill`) to {verb} it,"
                " no --force needed")

    def check(self) -> None:
        """Raise a one-line error unless the group is complete, current and intact."""
        state, why = self._inspect()
        if state == "ok":
            return
        error = {"missing": MlfdError, "corrupt": CorruptArtifact}.get(state, StaleCacheError)
        raise error(self._rebuild_hint(why))

    def begin(self, arrays: dict[str, tuple[tuple[int, ...], str]],
              restart: bool = False) -> CacheWriter:
        """Write into the staging group: ``arrays`` maps name -> (shape, dtype). A staged
        write of the same fingerprint and arrays is resumed unless ``restart``."""
        self._recover()
        spec = {k: [[int(n) for n in shape], np.dtype(dtype).name]
                for k, (shape, dtype) in arrays.items()}
        set_interrupt_note(f"cache {self.path}: the next run resumes its extraction at the "
                           "last complete chunk")
        return (None if restart else self._resume(spec)) or self._fresh(spec)

    def _resume(self, spec: dict) -> CacheWriter | None:
        try:
            prog = json.loads((self.staging / PROGRESS).read_text())
            if prog["digest"] != digest(self.fingerprint) or prog["arrays"] != spec:
                return None
            g = _zarr().open_group(store=str(self.staging), mode="r+")
            handles = {k: g[k] for k in spec}
            cursors = {k: int(prog["cursors"][k]) for k in spec}
        except (OSError, *DECODE_ERRORS):
            return None  # nothing usable staged: start afresh
        for k, a in handles.items():  # defensive: only whole chunks count as written
            if cursors[k] != a.shape[0]:
                cursors[k] = min(cursors[k], a.shape[0]) // a.chunks[0] * a.chunks[0]
        return CacheWriter(self, g, handles, spec, cursors)

    def _fresh(self, spec: dict) -> CacheWriter:
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.parent.mkdir(parents=True, exist_ok=True)
        g = _zarr().open_group(store=str(self.staging), mode="w")
        g.attrs.update({"complete": False, "format": FORMAT, "fingerprint": self.fingerprint,
                        "fingerprint_digest": digest(self.fingerprint), "arrays": spec})
        handles = {}
        for name, (shape, dtype) in spec.items():
            row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            rows = max(1, min(shape[0], CHUNK_BYTES // max(row, 1)))
            handles[name] = g.create_array(name, shape=shape, chunks=(rows, *shape[1:]),
                                           dtype=dtype, compressors=_codecs(), fill_value=0)
        writer = CacheWriter(self, g, handles, spec, {k: 0 for k in spec})
        writer._save_progress()
        return writer

    def _promote(self) -> None:
        self._dirs.promote(drop=(PROGRESS,))

    def load(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Whole arrays in memory: random batches from zarr chunks would be ~1000x slower."""
        self.check()
        stored = _attrs(self.path)["arrays"]
        names = list(names or stored)
        if unknown := [k for k in names if k not in stored]:
            raise MlfdError(f"cache {self.path} has no array {unknown[0]!r} (has {', '.join(stored)})")
        out, g = {}, _zarr().open_group(store=str(self.path), mode="r")
        for k in names:
            try:
                out[k] = g[k][...]
            except DECODE_ERRORS as e:  # damaged after check(): still one clear line
                raise CorruptArtifact(self._rebuild_hint(
                    f"corrupt: array {k} failed to decode ({type(e).__name__})")) from e
        return out

    def open_read(self):
        """The checked, complete group opened read-only (zarr arrays read lazily by slice)."""
        self.check()
        return _zarr().open_group(store=str(self.path), mode="r")

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class CacheWriter:
    """Rows in order per array; only whole chunks are written, each followed by a durable
    cursor, so a resumed write starts on a chunk boundary and never rewrites part of a
    chunk that a kill may have torn."""

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
        the minimum cursor of several arrays rewrites nothing."""
        if hasattr(values, "detach"):  # torch tensor, without importing torch here
            values = values.detach().cpu().numpy()
        arr = self.handles[name]
        values = np.asarray(values, dtype=arr.dtype)
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
        if stop < arr.shape[0]:  # whole chunks only; the tail chunk once the array is full
            stop = start + (stop - start) // arr.chunks[0] * arr.chunks[0]
        if stop == start:
            return
        block = np.concatenate(self._pending[name])
        arr[start:stop] = block[:stop - start]
        self._pending[name] = [block[stop - start:]] if stop < self._next[name] else []
        self._durable[name] = stop
        self._save_progress()

    def _save_progress(self) -> None:
        _write_json(self.group.staging / PROGRESS, {
            "digest": digest(self.group.fingerprint), "arrays": self._spec,
            "cursors": self._durable})

    def close(self) -> None:
        """Check every row is in, write the manifest, then replace the complete group."""
        for name, arr in self.handles.items():
            if self._next[name] != arr.shape[0]:
                raise MlfdError(f"cache array {name}: wrote {self._next[name]} of {arr.shape[0]} rows")
        self.zgroup.attrs["complete"] = True
        staging = self.group.staging
        _write_json(staging / MANIFEST, {"files": _manifest(staging)})
        self.group._promote()
        set_interrupt_note(None)
