"""Writing a cache group: staged, resumable, shared out between ranks, promoted whole.

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

Object stores have no atomic rename, so there a group counts only when its ``complete``
attribute is set AND its manifest exists, and the manifest is always written last.
Promotion there is copy-then-delete: once the staging group holds its manifest (its mark
that promotion may start), the final group's manifest is deleted first, then its files;
the staging files are copied, its manifest last, and the staging group is deleted. A kill
at any point leaves a final group without a manifest (never "ok") beside a complete
staging group, whose promotion the next run finishes.
"""

from __future__ import annotations

import json
import uuid

import numpy as np

from ..errors import MlfdError
from ..storage.diskio import writing
from ..storage.fingerprint import digest
from ..storage.staging import StagedDir, set_interrupt_note
from .integrity import DECODE_ERRORS, _manifest, _read_only
from .layout import (
    FORMAT,
    MANIFEST,
    PROGRESS,
    STORED_AS,
    _codecs,
    _logical,
    _shard_rows,
    _to_stored,
    _zarr,
    layout,
    rank_progress,
)
from .quant import QUANTISED, SCALE_SUFFIX, is_scale, quantise, scale_name, scale_shape
from .shards import for_array


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


class StagedWrites:
    """The writing half of ``CacheGroup`` (a mixin: it uses the group's ``path``, ``fs``,
    ``fingerprint``, ``codec``, ``clevel``, ``staging``, ``location``, ``_storage`` and
    ``_dir``): staging, resuming, sharing out and promoting a write."""

    def _recover(self) -> None:
        if self.fs is None:
            StagedDir(self.path).recover()
        elif not _read_only() and self._dir(self.staging).exists(MANIFEST):
            self._copy_promote()  # a promotion a kill interrupted

    def _spec(self, arrays: dict[str, tuple[tuple[int, ...], str]]) -> dict:
        spec = {}
        for k, (shape, dtype) in arrays.items():
            spec[k] = [[int(n) for n in shape], _logical(dtype)]
            if spec[k][1] == QUANTISED:  # its scales: an array of its own, written with it
                spec[scale_name(k)] = [list(scale_shape(shape)), "float32"]
        return spec

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
        handles, rows = {}, {}
        for name, (shape, logical) in spec.items():
            dtype = np.dtype(STORED_AS.get(logical, logical))
            chunks, shards = layout(shape, dtype.itemsize)
            if is_scale(name) and name.removesuffix(SCALE_SUFFIX) in rows:
                # the rows of its values' chunks and shards: both arrays' shards, cursors
                # and ranks' ranges coincide
                r, per = rows[name.removesuffix(SCALE_SUFFIX)]
                chunks = (r, 1, *shape[2:]) if len(shape) >= 3 else (r, *shape[1:])
                shards = (per, *shape[1:])
            rows[name] = (chunks[0], shards[0])
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

def _writing(group: StagedWrites):
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

    def __init__(self, group: StagedWrites, zgroup, handles: dict, spec: dict,
                 cursors: dict[str, int], rows: dict[str, tuple[int, int]] | None = None,
                 shared: tuple[int, dict] | None = None):
        self.group, self.zgroup, self.handles, self._spec = group, zgroup, handles, spec
        self._durable = dict(cursors)  # rows written and recorded in the progress file
        self._next = dict(cursors)  # first row not yet held (durable + pending)
        self._pending: dict[str, list[np.ndarray]] = {k: [] for k in handles}
        self._pos = {k: 0 for k in handles}  # row index of the caller's next append
        self._rows = rows or {k: (0, a.shape[0]) for k, a in handles.items()}
        self._shared = shared  # (rank, shares) in a sharded extraction; None: the only writer
        self._direct: dict = {}  # name -> shards.ShardArray, or None: zarr-python writes it

    def cursor(self, name: str) -> int:
        """Rows of ``name`` already durable: production may resume at any row up to this
        (an int8 array: up to where its scales are durable too)."""
        scales = self._durable.get(scale_name(name), self._durable[name])
        return min(self._durable[name], scales)

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
        if self._spec[name][1] == QUANTISED and \
                str(getattr(values, "dtype", "")).removeprefix("torch.") != "int8":
            values, scales = quantise(values)
            self.append(scale_name(name), scales, start)
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
            self._write(name, start, stop, block[:stop - start])
        self._pending[name] = [block[stop - start:]] if stop < self._next[name] else []
        self._durable[name] = stop
        self._save_progress()

    def _write(self, name: str, start: int, stop: int, values: np.ndarray) -> None:
        """Rows [start, stop): whole shards (the array's tail last). Local arrays of mlfd's
        layout: each shard encoded on all cores and written as one file
        (``shards.ShardArray``); others through zarr-python."""
        arr = self.handles[name]
        if name not in self._direct:
            self._direct[name] = for_array(arr)
        direct, step = self._direct[name], _shard_rows(arr)
        if direct is None or start % step:
            arr[start:stop] = values
            return
        for s in range(start, stop, step):
            direct.write_shard(s // step, values[s - start:min(s + step, stop) - start])

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
