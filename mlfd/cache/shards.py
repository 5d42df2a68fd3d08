"""Whole shards read and written directly, at the codec's speed, in zarr's own format.

zarr-python decodes a sharded array's inner chunks one asyncio task at a time and copies
them through several buffers; for mlfd's caches that put reads at a fraction of what the
codec does on the same cores (``bench/cache.py``: ``roofline``). The arrays mlfd writes
have one exact layout (``layout._codecs``): Zarr v3 ``sharding_indexed``, inner chunks
``bytes`` (little endian) → Blosc (optional) → crc32c, the index at the end of each shard
as ``bytes`` → crc32c, fill value 0. For that layout on a local disk, this module does
the work itself: one ``pread`` per chunk, its crc32c checked, Blosc decompressing straight
into the caller's buffer, chunks spread over a thread pool (Blosc and file reads release
the GIL); and whole shards encoded the same way and written as one file. The files are
the ones zarr-python reads and writes (tests read each with the other), so any zarr
client still reads the cache. Any other array (another codec chain, a remote store)
keeps going through zarr-python: ``for_array`` returns None for it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_EMPTY = 2**64 - 1  # an index entry of a chunk that was never written: fill value
_POOL: dict[int, ThreadPoolExecutor] = {}  # per process: a forked child gets its own
_POOL_LOCK = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """One pool per process (``_threads()`` threads): the unit of work is one chunk."""
    pid = os.getpid()
    with _POOL_LOCK:
        if pid not in _POOL:
            _POOL.clear()  # a parent's pool has no threads in a forked child
            _POOL[pid] = ThreadPoolExecutor(_threads(), thread_name_prefix="mlfd-shard")
        return _POOL[pid]


def _threads() -> int:
    """A thread per core, or OMP_NUM_THREADS where set (`--nproc` shares the cores out
    among the processes of a node that way)."""
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        omp = 0
    return max(1, omp or os.cpu_count() or 1)


def _crc(data) -> int:
    import google_crc32c  # zarr's own crc32c dependency

    # a numpy view: the C function takes buffers, not memoryviews, and copies nothing
    return google_crc32c.value(np.frombuffer(data, np.uint8))


class ShardArray:
    """Direct access to one local array of mlfd's layout: reads of rows (all views, or
    one view of an array chunked one view at a time) and writes of whole shards."""

    def __init__(self, root: Path, shape, dtype, chunks, shards, blosc, key):
        self.root, self.shape, self.dtype = Path(root), tuple(shape), np.dtype(dtype)
        self.chunks, self.shards, self.key = tuple(chunks), tuple(shards), key
        self.blosc = blosc  # (cname, clevel) or None: no compressor
        # chunks per shard along each axis: the index's shape, C order
        self.grid = tuple(s // c for s, c in zip(self.shards, self.chunks))
        self.rows, self.shard_rows = self.chunks[0], self.shards[0]
        self.per_view = len(self.shape) >= 3 and self.chunks[1] == 1 and self.shape[1] > 1
        self.chunk_bytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self._index: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ files

    def path(self, shard: int) -> Path:
        coords = (shard, *([0] * (len(self.shape) - 1)))
        return self.root / self.key(coords)

    def _cell(self, i: int, v: int | None) -> tuple[int, ...]:
        """Where chunk ``i`` of a shard (in view ``v``) sits in the shard's index."""
        if len(self.grid) == 1:
            return (i,)
        return (i, v or 0, *([0] * (len(self.grid) - 2)))

    def index(self, shard: int) -> np.ndarray | None:
        """(offset, nbytes) per inner chunk of a shard, checked; None: no file (all fill).
        Cached: the reader is for a complete group, whose files no longer change."""
        with self._lock:
            if shard in self._index:
                return self._index[shard]
        n = int(np.prod(self.grid))
        size = n * 16 + 4
        try:
            with open(self.path(shard), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() < size:
                    raise ValueError(f"shard {self.path(shard)} is shorter than its index")
                fh.seek(-size, os.SEEK_END)
                raw = fh.read(size)
        except FileNotFoundError:
            idx = None
        else:
            if _crc(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise ValueError(f"shard {self.path(shard)}: index checksum mismatch")
            idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(*self.grid, 2)
        with self._lock:
            self._index[shard] = idx
        return idx

    def _chunk(self, fd: int, entry, dest: np.ndarray, where: str) -> None:
        """Decode one stored chunk into ``dest`` (contiguous, the chunk's full shape)."""
        off, nbytes = int(entry[0]), int(entry[1])
        if off == _EMPTY:
            dest.fill(0)
            return
        data = os.pread(fd, nbytes, off)
        if len(data) != nbytes or nbytes < 4:
            raise ValueError(f"{where}: chunk truncated ({len(data)} of {nbytes} bytes)")
        body = memoryview(data)[:-4]
        if _crc(body) != int.from_bytes(data[-4:], "little"):
            raise ValueError(f"{where}: chunk checksum mismatch")
        if self.blosc is None:
            if len(body) != self.chunk_bytes:
                raise ValueError(f"{where}: chunk of {len(body)} bytes, "
                                 f"{self.chunk_bytes} expected")
            dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(body, np.uint8)
            return
        from numcodecs import blosc

        if int.from_bytes(body[4:8], "little") != self.chunk_bytes:  # Blosc header: nbytes
            raise ValueError(f"{where}: chunk decodes to the wrong size")
        # straight into the caller's memory
        blosc.decompress(body, dest)

    # ------------------------------------------------------------------ reads

    def read(self, lo: int, hi: int, view: int | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
        """Rows [lo, hi) (all views; or ``view`` only, of a per-view array), in ``out`` if
        given (contiguous, the result's shape)."""
        shape = (hi - lo, *self.shape[1:]) if view is None else (hi - lo, *self.shape[2:])
        if out is None:
            out = np.empty(shape, self.dtype)
        views = range(self.shape[1]) if (view is None and self.per_view) else [view]
        jobs = []
        c0, c1 = lo // self.rows, -(-hi // self.rows)
        for c in range(c0, c1):
            shard, local = divmod(c * self.rows, self.shard_rows)
            idx = self.index(shard)
            r0, r1 = c * self.rows, min((c + 1) * self.rows, self.shape[0])
            a, b = max(lo, r0), min(hi, r1)
            for v in views:
                entry = (_EMPTY, 0) if idx is None else idx[self._cell(local // self.rows, v)]
                jobs.append((shard, entry, r0, a, b, v))
        fds: dict[int, int] = {}
        try:
            for shard in {j[0] for j in jobs}:
                p = self.path(shard)
                if p.exists():
                    fds[shard] = os.open(p, os.O_RDONLY)
            futures = [pool().submit(self._job, fds.get(j[0], -1), out, lo, view, *j)
                       for j in jobs]
            for f in futures:
                f.result()
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def _job(self, fd, out, lo, view, shard, entry, r0, a, b, v) -> None:
        where = str(self.path(shard))
        whole = (a, b) == (r0, r0 + self.rows)
        if view is not None:  # one view: rows of ``out`` are rows of the chunk
            target = out[a - lo:b - lo]
            if whole and target.flags.c_contiguous:
                self._chunk(fd, entry, target.reshape(self.chunks), where)
                return
        tmp = np.empty(self.chunks, self.dtype)
        self._chunk(fd, entry, tmp, where)
        part = tmp[a - r0:b - r0]
        if view is not None:  # a chunk of one view: (rows, 1, ...)
            out[a - lo:b - lo] = part[:, 0]
        elif v is None:
            out[a - lo:b - lo] = part
        else:
            out[a - lo:b - lo, v] = part[:, 0]

    # ------------------------------------------------------------------ writes

    def write_shard(self, shard: int, values: np.ndarray) -> None:
        """Shard ``shard`` whole: its rows (all of them; the array's last shard may hold
        fewer), encoded chunk by chunk on the pool, then one file: the chunks, the index,
        the index's crc32c."""
        start = shard * self.shard_rows
        n = min(self.shard_rows, self.shape[0] - start)
        if values.shape != (n, *self.shape[1:]) or values.dtype != self.dtype:
            raise ValueError(f"shard {shard}: expected {(n, *self.shape[1:])} "
                             f"{self.dtype}, got {values.shape} {values.dtype}")
        cells = []  # (index position, rows, view) of every chunk that holds rows
        for i in range(self.grid[0]):
            r0, r1 = i * self.rows, min((i + 1) * self.rows, n)
            if r0 >= n:
                break
            for v in (range(self.grid[1]) if self.per_view else [0]):
                cells.append((self._cell(i, v), r0, r1, v))
        blobs = list(pool().map(lambda c: self._encode(values, *c[1:]), cells))
        index = np.full((*self.grid, 2), _EMPTY, dtype="<u8")
        offset = 0
        for (pos, *_), blob in zip(cells, blobs):
            index[pos] = (offset, len(blob))
            offset += len(blob)
        raw = index.tobytes()
        write_file(self.path(shard), [*blobs, raw, _crc(raw).to_bytes(4, "little")])

    def _encode(self, values: np.ndarray, r0: int, r1: int, v: int) -> bytes:
        part = values[r0:r1, v:v + 1] if self.per_view else values[r0:r1]
        if r1 - r0 < self.rows or not part.flags.c_contiguous:
            chunk = np.zeros(self.chunks, self.dtype)  # the array's edge: fill value
            chunk[:r1 - r0] = part
        else:
            chunk = part
        if self.blosc is None:
            body = chunk.tobytes()
        else:
            from numcodecs import blosc

            cname, clevel = self.blosc
            # the buffer's item size is Blosc's typesize, as zarr's BloscCodec sets it
            body = blosc.compress(chunk, cname.encode(), clevel, blosc.SHUFFLE)
        return bytes(body) + _crc(body).to_bytes(4, "little")


def write_file(path: Path, parts: list[bytes]) -> None:
    """One shard file, in place as zarr-python writes it: a kill may tear it, and the
    writer's cursor (saved after it) then says it is not durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for part in parts:
            fh.write(part)


def for_array(arr) -> ShardArray | None:
    """A ShardArray for a zarr array of mlfd's layout on a local disk; None otherwise
    (zarr-python reads and writes it)."""
    try:
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.storage import LocalStore

        meta = arr.metadata
        if not isinstance(arr.store, LocalStore) or len(meta.codecs) != 1:
            return None
        sharding = meta.codecs[0]
        if not isinstance(sharding, ShardingCodec) or sharding.index_location.value != "end":
            return None
        inner, index = list(sharding.codecs), list(sharding.index_codecs)
        if [type(c) for c in index] != [BytesCodec, Crc32cCodec] or not inner or \
                not isinstance(inner[0], BytesCodec) or not isinstance(inner[-1], Crc32cCodec):
            return None
        if any(c.endian is not None and c.endian.value != "little" for c in (inner[0], index[0])):
            return None
        middle = inner[1:-1]
        dtype = np.dtype(meta.data_type.to_native_dtype())
        blosc = None
        if middle:
            b = middle[0]
            if len(middle) != 1 or not isinstance(b, BloscCodec) or b.shuffle.value != "shuffle" \
                    or b.blocksize != 0:
                return None
            if b.typesize not in (None, dtype.itemsize):
                return None
            blosc = (b.cname.value, int(b.clevel))
        if dtype.byteorder == ">" or float(meta.fill_value) != 0:
            return None
        root = Path(arr.store.root) / arr.path if arr.path else Path(arr.store.root)
        return ShardArray(root, arr.shape, dtype, sharding.chunk_shape,
                          meta.chunk_grid.chunk_shape, blosc,
                          meta.chunk_key_encoding.encode_chunk_key)
    except (AttributeError, TypeError, ValueError, ImportError):
        return None  # anything unexpected: zarr-python, which reads every layout


def read_rows(arr, lo: int = 0, hi: int | None = None, view: int | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """``arr[lo:hi]`` (``arr[lo:hi, view]`` with a view) of a zarr array: directly where
    ``for_array`` can, else through zarr-python. Both give the same values."""
    hi = arr.shape[0] if hi is None else min(int(hi), arr.shape[0])
    direct = for_array(arr)
    if direct is not None:
        return direct.read(int(lo), hi, view, out)
    values = arr[lo:hi] if view is None else arr[lo:hi, view]
    if out is None:
        return values
    out[...] = values
    return out
