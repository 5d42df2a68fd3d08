"""Streaming reads of a target cache too big for memory: windows of chunks, rows per batch.

A pass visits (sample, view) pairs in a given order (best: ``chunk_order``, whose windows
each touch a few chunks, each chunk in one view). The order is cut into windows, each
touching at most ``window`` chunks of ``chunk_rows`` samples; a background thread decodes
the (chunk, view) pairs a window uses once (runs of consecutive chunks in one view read as
``array[lo:hi, v]``: a cache chunked one view at a time decodes no other view) while the
consumer gathers the rows of the current one into batches. At most ``prefetch + 1``
decoded windows are alive at a time. Any order is read correctly; a shuffled one just
makes windows small. ``EpochStream`` keeps one reader across epochs, reading the next
epoch's first window while the current epoch ends.
Small arrays (logits beside 7x7 feature maps) may be passed in whole as ``resident``:
their large chunks would otherwise be decoded again by every window touching them.

Also here: the memory budget that decides between this and whole arrays in memory
(``parse_size``, ``format_size``, ``default_budget``).
"""

from __future__ import annotations

import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CorruptArtifact, MlfdError
from .integrity import DECODE_ERRORS
from .layout import to_tensor
from .quant import QUANTISED, dequantised, scale_name
from .shards import for_array

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """Bytes from ``512MiB``, ``4GiB``, ``1.5G``, ``2GB`` or ``1000000``: K/M/G/T and
    KiB/MiB/... are powers of 1024, KB/MB/GB/TB powers of 1000. One-line MlfdError if bad."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*", str(text).lower())
    # "KiB" and "Ki" are binary; "KB" is decimal; "K" alone is binary, as in `free -h`
    unit = m and (m.group(2) + ("b" if m.group(4) and not m.group(3) and m.group(2) else ""))
    value = float(m.group(1)) * _UNITS[unit] if m else 0
    if not m or value < 1:
        raise MlfdError(f"--cache-memory {text!r}: expected a size such as 512MiB, 4GiB, 1.5G "
                        "or a number of bytes (at least 1)")
    return int(value)


def format_size(n: int) -> str:
    """``12.3 GiB``, ``512.0 KiB``, ``100 B``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo (reclaimable cache included); else free pages."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(device: torch.device) -> int | None:
    """Half the memory free now (None: unknown, keep targets in memory as before).

    On CUDA the targets live on the GPU but are first read whole into host memory, so the
    budget is half of the smaller of the two."""
    host = available_host_memory()
    budget = None if host is None else host // 2
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = free // 2 if budget is None else min(budget, free // 2)
    return budget


def iter_windows(index: np.ndarray, chunk_rows: int, window: int) -> Iterator[tuple[int, int]]:
    """Cut an order's sample indices into consecutive [start, stop) pieces, each touching at
    most ``window`` chunks: greedy, so chunk_order's windows come out whole."""
    seen, start = set(), 0
    for pos, chunk in enumerate((np.asarray(index) // chunk_rows).tolist()):
        if chunk not in seen:
            if len(seen) == window:
                yield start, pos
                seen, start = set(), pos
            seen.add(chunk)
    if len(index):
        yield start, len(index)


def order_windows(index: np.ndarray, chunk_rows: int, window: int) -> list[tuple[int, int]]:
    return list(iter_windows(index, chunk_rows, window))


def take_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values.index_select(0, index)``: on the host through numpy's take, which copies
    whole rows (2-3x index_select's speed on fp16 rows of a few KiB)."""
    if values.device.type != "cpu" or values.dtype == torch.bool:
        return values.index_select(0, index.to(values.device))
    raw = values.view(torch.int16) if values.dtype == torch.bfloat16 else values
    out = torch.from_numpy(np.take(raw.numpy(), index.numpy(), axis=0))
    return out.view(torch.bfloat16) if values.dtype == torch.bfloat16 else out


def gather_rows(values: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """``values[index, view]`` for (N, V, ...) values: one row gather over the flattened
    (sample, view) axis, hundreds of times faster on CPU than two-tensor indexing."""
    flat = values.reshape(-1, *values.shape[2:])
    return take_rows(flat, index * values.shape[1] + view)


@dataclass
class _Window:
    tag: int  # which order of the reader's sequence (an epoch)
    start: int  # positions [start, stop) of that order
    stop: int
    data: dict[str, torch.Tensor]  # one view of each chunk run, concatenated: (rows, ...)
    local: torch.Tensor  # row in ``data`` of each position's (sample, view)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def _default_hint(why: str) -> str:
    return f"target cache: {why}; re-run `mlfd cache` (or `mlfd distill`) to rebuild it"


class _Reader:
    """One background thread reading the windows of a sequence of (tag, order) pairs, one
    order after the other, at most ``prefetch + 1`` windows alive: the one the consumer
    holds and those read ahead, across order boundaries too."""

    def __init__(self, stream: _StreamBase, orders: Iterator[tuple[int, np.ndarray]]):
        self.q: queue.Queue = queue.Queue()  # bounded by ``slots``: one slot per live window
        self.slots = threading.Semaphore(stream.prefetch + 1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(stream, orders),
                                       name="mlfd-target-stream", daemon=True)
        self.thread.start()

    def next(self) -> _Window:
        while True:
            try:
                item = self.q.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive() and self.q.empty():
                    raise RuntimeError("target stream reader ended without a result") from None
                continue
            if isinstance(item, _Failure):
                raise item.exc
            if item is _END:
                raise RuntimeError("target stream reader ran out of windows")
            return item

    def release(self) -> None:
        """The consumer is done with a window: its slot may hold the next one."""
        self.slots.release()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def _produce(self, stream: _StreamBase, orders) -> None:
        try:
            # several slices in flight: zarr's per-call latency overlaps, decoding spreads
            # over cores (blosc releases the GIL)
            with ThreadPoolExecutor(stream.readers,
                                    thread_name_prefix="mlfd-target-read") as pool:
                for tag, order in orders:  # the next order is made only when it is needed
                    for start, stop_pos in iter_windows(order[:, 0], stream.chunk_rows,
                                                        stream.window):
                        while not self.slots.acquire(timeout=0.1):  # wait for a free slot
                            if self.stop.is_set():
                                return
                        if self.stop.is_set():
                            return
                        w = stream._read(tag, order, start, stop_pos, self.stop, pool)
                        if w is None:
                            return
                        self.q.put(w)
                    if self.stop.is_set():
                        return
            self.q.put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            self.q.put(_Failure(e))


class _StreamBase:
    """What TargetStream and EpochStream share: the arrays, the window reader, batching."""

    def __init__(self, zgroup, names: list[str], batch_size: int, *, chunk_rows: int,
                 window: int, device: torch.device | str = "cpu", prefetch: int = 1,
                 hint: Callable[[str], str] | None = None,
                 resident: dict[str, torch.Tensor] | None = None, readers: int | None = None,
                 on_damage: Callable[[str, str], object] | None = None):
        if not names or batch_size < 1 or chunk_rows < 1 or window < 1 or prefetch < 0:
            raise ValueError("names must be given, batch_size, chunk_rows and window >= 1, "
                             "prefetch >= 0")
        self.resident = {k: v for k, v in (resident or {}).items() if k in names}
        self.arrays = {k: zgroup[k] for k in names if k not in self.resident}
        spec = dict(zgroup.attrs).get("arrays") or {}
        # an int8 array's scales are read with it, and multiplied in once a window is read
        self.arrays.update({scale_name(k): zgroup[scale_name(k)] for k in list(self.arrays)
                            if (spec.get(k) or [None, None])[1] == QUANTISED})
        # local arrays of mlfd's layout are decoded by mlfd.cache.shards, at the codec's speed
        self.direct = {k: for_array(a) for k, a in self.arrays.items()}
        # the dtype the values stand for (bfloat16 may be stored as uint16)
        self.logical = {k: (spec.get(k) or [None, None])[1] for k in self.arrays}
        self.names = list(names)
        self.n = int(next(iter({**self.arrays, **self.resident}.values())).shape[0])
        self.readers = readers or min(4, os.cpu_count() or 1)
        self.batch_size, self.chunk_rows, self.window = batch_size, chunk_rows, window
        self.prefetch = prefetch
        self.device = torch.device(device)
        self.hint = hint or _default_hint
        # what records an array that failed to decode, so that a re-run rebuilds the group
        # (its memo says intact): by default the cache group whose _rebuild_hint is the hint
        self.on_damage = on_damage or getattr(getattr(hint, "__self__", None),
                                              "record_damage", None)

    def _batches(self, reader: _Reader, tag: int, order: np.ndarray,
                 done: Callable[[], None] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``order`` from the windows ``reader`` hands out for ``tag``.
        ``done`` is called once every batch has been handed out, before the last is
        yielded: the reader may then already fill the freed slot with what comes next."""
        cur: _Window | None = None
        if not len(order) and done is not None:  # nothing to hand out (a rank's empty share)
            done()
        for b0 in range(0, len(order), self.batch_size):
            b1 = min(len(order), b0 + self.batch_size)
            parts, s = [], b0
            while s < b1:  # a batch may straddle two windows
                if cur is None or s >= cur.stop:
                    if cur is not None:
                        cur = None
                        reader.release()
                    cur = reader.next()
                    if (cur.tag, cur.start) != (tag, s):  # defensive: reader out of step
                        raise RuntimeError(f"target stream read window ({cur.tag}, "
                                           f"{cur.start}), expected ({tag}, {s})")
                e = min(b1, cur.stop)
                parts.append(self._gather(cur, s, e))
                s = e
            batch = parts[0] if len(parts) == 1 else {
                k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            if self.resident:
                idx = torch.from_numpy(order[b0:b1, 0])
                view = torch.from_numpy(order[b0:b1, 1])
                batch.update({k: gather_rows(v, idx, view) for k, v in self.resident.items()})
            if b1 == len(order):  # the batch holds copies: the last window may go now
                cur = None
                reader.release()
                if done is not None:
                    done()
            yield {k: self._move(batch[k]) for k in self.names}

    def _gather(self, w: _Window, s: int, e: int) -> dict[str, torch.Tensor]:
        local = w.local[s - w.start:e - w.start]
        return {k: take_rows(v, local) for k, v in w.data.items()}

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned: the copy overlaps the running step
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _read(self, tag: int, order: np.ndarray, start: int, stop_pos: int,
              stop: threading.Event, pool: ThreadPoolExecutor) -> _Window | None:
        """Decode the (chunk, view) pairs positions [start, stop_pos) of ``order`` use:
        ``array[lo:hi, v]`` per run of consecutive chunks read in one view v, so a cache
        chunked one view at a time decodes no other view."""
        idx, view = order[start:stop_pos, 0], order[start:stop_pos, 1]
        R = self.chunk_rows
        # (view, chunk) as one sortable number; the stride leaves a gap between views, so
        # consecutive numbers are consecutive chunks of one view
        stride = -(-self.n // R) + 1
        key = view * stride + idx // R
        keys = np.unique(key)
        # runs of consecutive chunks in one view: one slice each, clipped at the array's end
        breaks = np.flatnonzero(np.diff(keys) != 1) + 1
        runs = []
        for ks in np.split(keys, breaks):
            v, c0 = divmod(int(ks[0]), stride)
            runs.append((v, c0 * R, min((int(ks[-1]) - v * stride + 1) * R, self.n)))
        starts = np.array([v * stride + lo // R for v, lo, _ in runs], dtype=np.int64)
        offs = np.cumsum([0] + [hi - lo for _, lo, hi in runs]).astype(np.int64)
        which = np.searchsorted(starts, key, side="right") - 1
        los = np.array([lo for _, lo, _ in runs], dtype=np.int64)
        local = torch.from_numpy(offs[which] + idx - los[which])
        out = {k: np.empty((int(offs[-1]), *arr.shape[2:]), dtype=arr.dtype)
               for k, arr in self.arrays.items()}

        def fill(k: str, i: int) -> None:
            v, lo, hi = runs[i]
            dest = out[k][offs[i]:offs[i] + hi - lo]
            direct = self.direct[k]
            if direct is not None:  # decoded straight into the window
                direct.read(lo, hi, v, dest)
            else:
                dest[...] = self.arrays[k][lo:hi, v]

        tasks = {k: [pool.submit(fill, k, i) for i in range(len(runs))] for k in self.arrays}
        try:
            for k, futures in tasks.items():
                for f in futures:
                    if stop.is_set():
                        return None
                    try:
                        f.result()
                    except DECODE_ERRORS as e:
                        if self.on_damage is not None:
                            self.on_damage(k, type(e).__name__)
                        raise CorruptArtifact(self.hint(
                            f"corrupt: array {k} failed to decode ({type(e).__name__})")) from e
        finally:
            for futures in tasks.values():  # on an early return or error: drop the rest
                for f in futures:
                    f.cancel()
        data = dequantised({k: _to_tensor(v, self.logical[k]) for k, v in out.items()},
                           self.logical)
        return _Window(tag, start, stop_pos, data, local)


class TargetStream(_StreamBase):
    """Batches of cached rows for an (M, 2) order of (sample, view) pairs.

    Iterating yields, per consecutive ``batch_size`` slice of the order, a dict mapping each
    name to a tensor of the rows ``array[sample, view]`` in the order's order, on
    ``device`` (via pinned memory on CUDA). ``zgroup`` is a read-only zarr group, e.g.
    ``CacheGroup.open_read()``; names in ``resident`` (whole (N, V, ...) tensors on the host)
    are gathered from those instead. ``hint`` turns "corrupt: ..." into the one-line
    message of the CorruptArtifact raised when a chunk fails to decode, after
    ``on_damage(name, why)`` recorded it (default: ``record_damage`` of the CacheGroup
    whose ``_rebuild_hint`` the hint is, so that a re-run rebuilds it). ``readers`` threads
    (default: up to 4) read a window's chunk runs concurrently. Stopping early (break, an
    error, garbage collection of the iterator) stops and joins the reader threads.
    """

    def __init__(self, zgroup, names: list[str], order: np.ndarray, batch_size: int, **kw):
        super().__init__(zgroup, names, batch_size, **kw)
        self.order = np.asarray(order, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # cut lazily in the reader thread: the first window is read as soon as it is known
        reader = _Reader(self, iter([(0, self.order)]))
        try:
            yield from self._batches(reader, 0, self.order)
        finally:
            reader.close()


class EpochStream(_StreamBase):
    """TargetStream over the epochs of a run, one reader thread across them: once the
    last window of epoch e is handed out, the first of epoch e + 1 is read while e's last
    batches train, so no epoch starts by waiting for its first window.

    ``order_of(epoch)`` gives each epoch's (M, 2) order (deterministic: it is made in the
    reader thread ahead of time, and ``order(epoch)`` returns the same array to whoever
    renders the images). ``epochs`` (exclusive) stops the read-ahead after the last
    epoch. ``epoch(e)`` iterates epoch e's batches, one epoch at a time; an epoch that is
    not the one read ahead (the first, a resumed run, one after an epoch left early)
    starts a fresh reader. Memory stays at ``prefetch + 1`` windows throughout.
    ``close()`` (or leaving a ``with`` block) stops and joins the reader threads."""

    def __init__(self, zgroup, names: list[str], order_of: Callable[[int], np.ndarray],
                 batch_size: int, *, epochs: int | None = None, **kw):
        super().__init__(zgroup, names, batch_size, **kw)
        self.order_of, self.epochs = order_of, epochs
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._reader: _Reader | None = None
        self._ahead: int | None = None  # the epoch the live reader reads next, if any

    def order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                if len(self._orders) >= 3:  # the current epoch, the next, one spare
                    del self._orders[min(self._orders)]
                self._orders[epoch] = np.asarray(self.order_of(epoch),
                                                 dtype=np.int64).reshape(-1, 2)
            return self._orders[epoch]

    def _more(self, epoch: int) -> bool:
        return self.epochs is None or epoch < self.epochs

    def _sequence(self, first: int) -> Iterator[tuple[int, np.ndarray]]:
        yield first, self.order(first)  # asked for: read even past ``epochs``
        e = first + 1
        while self._more(e):
            yield e, self.order(e)
            e += 1

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        order = self.order(epoch)
        if self._reader is None or self._ahead != epoch:
            self.close()
            self._reader = _Reader(self, self._sequence(epoch))
        reader, self._ahead = self._reader, None
        complete = False

        def done():
            nonlocal complete
            complete = True
            self._ahead = epoch + 1 if self._more(epoch + 1) else None

        try:
            yield from self._batches(reader, epoch, order, done)
        finally:
            if not complete and self._reader is reader:  # left early: windows out of step
                self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._ahead = None, None

    def __enter__(self) -> EpochStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_tensor(values: np.ndarray, logical: str | None) -> torch.Tensor:
    """The store's conversion where the dtype is known (bfloat16 kept as uint16 on disk)."""
    if logical is not None:
        return to_tensor(values, logical)
    return torch.from_numpy(values)
