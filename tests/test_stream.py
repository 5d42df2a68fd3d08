"""Streaming target caches: chunk-shuffled orders, the windowed reader, and `mlfd distill`
choosing between targets in memory and streamed ones by --cache-memory."""

import json
import threading
import time

import numpy as np
import pytest
import torch
import zarr
from helpers import LOCAL, bad, edit_experiment, run

from mlfd.cache import CacheGroup, layout
from mlfd.cache.stream import (
    EpochStream,
    TargetStream,
    format_size,
    order_windows,
    parse_size,
)
from mlfd.data.sampling import chunk_order, train_order
from mlfd.errors import CorruptArtifact, MlfdError


def _stream_threads():
    """The reader thread ("mlfd-target-stream") and its pool ("mlfd-target-read_N")."""
    return [t for t in threading.enumerate() if t.name.startswith("mlfd-target") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leaked_reader():
    yield
    for _ in range(50):  # a closed stream joins its thread before returning; allow slack
        if not _stream_threads():
            break
        time.sleep(0.05)
    assert _stream_threads() == []


# --------------------------------------------------------------------------- chunk_order


def _windows_of(idx, chunk_rows):
    """(chunks in order of first appearance, positions of each chunk's rows)."""
    chunks = idx // chunk_rows
    first = {}
    for p, c in enumerate(chunks.tolist()):
        first.setdefault(c, p)
    seq = sorted(first, key=first.get)
    return seq, {c: np.flatnonzero(chunks == c) for c in seq}


@pytest.mark.parametrize("n,R,W", [(23, 5, 2), (100, 7, 3), (64, 8, 1), (10, 4, 9), (1, 3, 2)])
def test_chunk_order_is_a_permutation_of_windows_with_per_chunk_views(n, R, W):
    V, seed = 4, 11
    for epoch in (0, 1, 2):
        o = chunk_order(n, epoch, seed, V, R, W)
        assert o.dtype == np.int64 and o.shape == (n, 2)
        assert sorted(o[:, 0].tolist()) == list(range(n))
        assert ((o[:, 1] >= 0) & (o[:, 1] < V)).all()
        # one view per (chunk, epoch): every sample of a chunk has its chunk's view
        views = _chunk_views(o, R)
        assert all(len(v) == 1 for v in views.values())
        # ... drawn from (seed, chunk, epoch) alone: another window or rank split of the
        # same epoch gives each chunk the same view
        assert _chunk_views(chunk_order(n, epoch, seed, V, R, W + 2), R) == views
        parts = [chunk_order(n, epoch, seed, V, R, W, rank=r, world=3) for r in range(3)]
        assert {c: v for p in parts for c, v in _chunk_views(p, R).items()} == views
        # consecutive groups of W chunks (by first appearance) fill consecutive position
        # ranges: a reader decoding W chunks at a time meets each chunk in one window
        seq, pos = _windows_of(o[:, 0], R)
        assert len(seq) == -(-n // R)
        end = 0
        for g in range(0, len(seq), W):
            p = np.sort(np.concatenate([pos[c] for c in seq[g:g + W]]))
            assert p.tolist() == list(range(end, end + len(p)))
            end += len(p)
        assert end == n
        np.testing.assert_array_equal(o, chunk_order(n, epoch, seed, V, R, W))  # deterministic


def _chunk_views(o, R):
    """{chunk: set of the views its samples have} of an order."""
    out = {}
    for i, v in o.tolist():
        out.setdefault(i // R, set()).add(v)
    return out


def test_chunk_views_are_uniform_and_fresh_every_epoch():
    n, R, V, epochs = 6000, 3, 4, 6  # 2000 chunks a epoch, 12000 draws
    per_epoch = []
    for e in range(epochs):
        o = chunk_order(n, e, 7, V, R, 5)
        per_epoch.append(np.array([next(iter(v)) for _, v in sorted(_chunk_views(o, R).items())]))
    draws = np.concatenate(per_epoch)
    counts = np.bincount(draws, minlength=V)
    # binomial(12000, 1/4): sd 47; 5 sd of slack
    assert np.abs(counts - len(draws) / V).max() < 5 * np.sqrt(len(draws) * (1 / V) * (1 - 1 / V))
    # a chunk's view of one epoch says nothing of the next: equal about 1/V of the time
    same = np.mean([np.mean(a == b) for a, b in zip(per_epoch, per_epoch[1:])])
    assert abs(same - 1 / V) < 0.05
    # nor do neighbouring chunks share theirs (views are not a function of the position)
    assert abs(np.mean(per_epoch[0][1:] == per_epoch[0][:-1]) - 1 / V) < 0.05
    # another seed, other views
    o = chunk_order(n, 0, 8, V, R, 5)
    other = np.array([next(iter(v)) for _, v in sorted(_chunk_views(o, R).items())])
    assert abs(np.mean(other == per_epoch[0]) - 1 / V) < 0.05


def test_chunk_order_shuffles_chunks_and_rows_per_epoch():
    n, R, W = 400, 10, 4
    a, b = chunk_order(n, 0, 3, 2, R, W), chunk_order(n, 1, 3, 2, R, W)
    assert not np.array_equal(a[:, 0], b[:, 0])
    seq, _ = _windows_of(a[:, 0], R)
    assert seq != sorted(seq)  # chunks shuffled
    first = a[: W * R, 0]
    assert not (np.diff(first) > 0).all()  # rows shuffled inside a window
    # a window mixes its W chunks: the first batch of 16 draws from more than one
    assert len(set((first[:16] // R).tolist())) > 1


@pytest.mark.parametrize("n,world", [(23, 3), (100, 4), (64, 2), (5, 8), (97, 1)])
def test_chunk_order_ranks_are_disjoint_complete_and_balanced(n, world):
    full = chunk_order(n, 2, 5, 3, 6, 2)
    parts = [chunk_order(n, 2, 5, 3, 6, 2, rank=r, world=world) for r in range(world)]
    # contiguous slices of the single-process epoch: disjoint, complete, same views
    np.testing.assert_array_equal(np.concatenate(parts), full)
    sizes = [len(p) for p in parts]
    assert sizes == [n // world + (r < n % world) for r in range(world)]
    # each rank reads its own chunks, sharing at most the windows split at slice edges
    chunks = [set((p[:, 0] // 6).tolist()) for p in parts]
    for r in range(world - 1):
        assert len(chunks[r] & chunks[r + 1]) <= 2
    with pytest.raises(ValueError, match="rank"):
        chunk_order(n, 0, 0, 3, 6, 2, rank=world, world=world)


def test_order_windows_cuts_chunk_order_at_its_windows():
    n, R, W = 95, 7, 3
    o = chunk_order(n, 0, 1, 2, R, W)
    cuts = order_windows(o[:, 0], R, W)
    n_chunks = -(-n // R)
    assert len(cuts) == -(-n_chunks // W)
    assert cuts[0][0] == 0 and cuts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert all(len(set((o[s:e, 0] // R).tolist())) <= W for s, e in cuts)
    # any order is cut into pieces of at most W chunks (a shuffled one: small pieces)
    t = train_order(n, 0, 1, 2)
    assert all(len(set((t[s:e, 0] // R).tolist())) <= W for s, e in order_windows(t[:, 0], R, W))


# --------------------------------------------------------------------------- the reader


def _group(path, n=103, views=3, seed=0):
    """A zarr group like a target cache: arrays of different chunk rows, plus labels."""
    rng = np.random.default_rng(seed)
    data = {"logits": rng.standard_normal((n, views, 5)).astype(np.float16),
            "L1": np.maximum(rng.standard_normal((n, views, 4, 2, 2)), 0).astype(np.float16),
            "labels": rng.integers(0, 5, n)}
    rows = {"logits": 10, "L1": 7, "labels": 50}
    g = zarr.open_group(str(path), mode="w")
    for k, v in data.items():
        # (N, V, ...) arrays chunked one view at a time, as the store writes them
        chunks = (rows[k], 1, *v.shape[2:]) if v.ndim >= 3 else (rows[k], *v.shape[1:])
        g.create_array(k, shape=v.shape, chunks=chunks, dtype=v.dtype)[...] = v
    g.attrs["arrays"] = {k: [list(v.shape), v.dtype.name] for k, v in data.items()}
    return zarr.open_group(str(path), mode="r"), data


class _Spy:
    """A read-only group whose arrays record every slice read from them."""

    def __init__(self, g):
        self.g, self.attrs, self.reads = g, g.attrs, []

    def __getitem__(self, name):
        arr, reads = self.g[name], self.reads

        class Array:
            shape, chunks, dtype = arr.shape, arr.chunks, arr.dtype

            def __getitem__(self, sel):
                rows, view = sel  # the reader's (rows, view) slices
                reads.append((name, rows.start, min(rows.stop, arr.shape[0]), view))
                return arr[sel]

        return Array()


def _bits(x):
    return np.asarray(x).view(np.uint16)


@pytest.mark.parametrize("batch", [1, 7, 16, 200])
@pytest.mark.parametrize("kind", ["chunk", "shuffled", "resident logits"])
def test_stream_yields_the_rows_of_in_memory_gathering(tmp_path, batch, kind):
    g, data = _group(tmp_path / "t.zarr")
    n, V = data["logits"].shape[:2]
    order = (train_order(n, 0, 0, V) if kind == "shuffled" else chunk_order(n, 1, 0, V, 10, 3))
    names = ["logits", "L1"]
    spy = _Spy(g)
    resident = {"logits": torch.from_numpy(data["logits"])} if kind == "resident logits" else None
    stream = TargetStream(spy, names, order, batch, chunk_rows=10, window=3, resident=resident)
    got = list(stream)
    assert len(got) == len(stream) == -(-n // batch)
    assert [len(b["logits"]) for b in got] == [min(batch, n - s) for s in range(0, n, batch)]
    for k in names:
        ref = data[k][order[:, 0], order[:, 1]]  # numpy fancy indexing: the in-memory path
        out = torch.cat([b[k] for b in got]).numpy()
        assert out.dtype == np.float16 and out.shape == ref.shape
        np.testing.assert_array_equal(_bits(out), _bits(ref))  # bitwise
    read = {k: sum(hi - lo for name, lo, hi, _ in spy.reads if name == k) for k in names}
    if kind != "shuffled":  # each chunk is read once, in one view: n rows per array
        assert read == ({"logits": 0, "L1": n} if resident else {"logits": n, "L1": n})
        # ... the view its samples have in the order, and no other
        view_of = dict(order.tolist())
        for _, lo, hi, v in spy.reads:
            assert {view_of[i] for i in range(lo, hi)} == {v}
    else:  # any order: every (sample, view) pair used is read, in its own view
        for name in names if not resident else ["L1"]:
            covered = {(i, v) for k, lo, hi, v in spy.reads if k == name for i in range(lo, hi)}
            assert set(map(tuple, order.tolist())) <= covered
    assert "labels" not in {name for name, *_ in spy.reads}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gather_rows_is_two_axis_fancy_indexing(dtype):
    from mlfd.cache.stream import gather_rows

    x = torch.randn(50, 3, 4, 2, 2).to(dtype)
    idx, view = torch.tensor([49, 0, 7, 7, 21]), torch.tensor([2, 0, 1, 1, 2])
    ref = x.float().numpy()[idx.numpy(), view.numpy()]
    out = gather_rows(x, idx, view)
    assert out.dtype == dtype and out.shape == (5, 4, 2, 2)
    np.testing.assert_array_equal(out.float().numpy(), ref)


def test_feed_decision_follows_the_budget(tmp_path):
    from mlfd.stages.distill import feed_of

    g, _ = _group(tmp_path / "t.zarr")  # 103 samples x 3 views: logits 30 B, L1 96 B a sample
    total = 103 * (30 + 96)
    feed = feed_of(g, total)
    assert (feed.streaming, feed.nbytes, feed.fingerprint()) == (False, total, {})
    # a byte short: streamed. logits (3090 B) fit a quarter of the budget and stay whole;
    # L1 is read in windows of its 7-row chunks, one view of each (32 B a sample), two
    # windows within the 9887 B left: 4943 // (7 * 32) = 22 chunks, rounded down to a
    # power of two (16), evened out over the epoch's 15 chunks: one window of 15
    feed = feed_of(g, total - 1)
    assert (feed.streaming, feed.resident, feed.chunk_rows, feed.window) == (
        True, ("logits",), 7, 15)
    assert feed.fingerprint() == {"order.kind": "chunk-shuffled", "order.window": 15,
                                  "order.chunk_rows": 7, "order.views": "per-chunk"}
    # less: logits no longer fit a quarter, both arrays streamed in 10-row chunks (11 of
    # them), one view of a sample 42 B: 4000 // (10 * 42) = 9 chunks, 8 as a power of two;
    # windows of 8 + 3 are evened out to 6 + 5
    feed = feed_of(g, 8000)
    assert (feed.resident, feed.chunk_rows, feed.window) == ((), 10, 6)
    o = chunk_order(103, 0, 0, 3, 10, feed.window)
    assert [len(set((o[s:e, 0] // 10).tolist())) for s, e in order_windows(o[:, 0], 10, 6)] == [
        6, 5]
    # nothing fits: both arrays streamed, chunks of the larger chunk rows, one per window
    feed = feed_of(g, 1)
    assert (feed.resident, feed.chunk_rows, feed.window) == ((), 10, 1)


def test_stream_reads_ahead_at_most_prefetch_windows(tmp_path, monkeypatch):
    g, data = _group(tmp_path / "t.zarr", n=100)
    order = chunk_order(100, 0, 0, 3, 10, 1)  # ten windows of one chunk
    calls = []
    real = TargetStream._read

    def counted(self, tag, order, start, *a):
        calls.append((tag, start))
        return real(self, tag, order, start, *a)

    monkeypatch.setattr(TargetStream, "_read", counted)
    for prefetch in (1, 3):
        calls.clear()
        it = iter(TargetStream(g, ["L1"], order, 4, chunk_rows=10, window=1, prefetch=prefetch))
        next(it)  # the consumer holds window 0
        time.sleep(0.5)  # ample time for the reader to run ahead as far as it may
        assert len(calls) == prefetch + 1  # read ahead, but no further than allowed
        it.close()
        assert _stream_threads() == []


def test_stopping_early_leaves_no_reader_thread(tmp_path):
    g, _ = _group(tmp_path / "t.zarr")
    order = chunk_order(103, 0, 0, 3, 10, 1)
    for _ in TargetStream(g, ["logits", "L1"], order, 4, chunk_rows=10, window=1):
        break
    assert _stream_threads() == []
    it = iter(TargetStream(g, ["logits"], order, 4, chunk_rows=10, window=1))
    next(it)
    del it  # dropped without close(): garbage collection stops the reader too
    assert _stream_threads() == []


def _arrays(batches, names):
    return {k: torch.cat([b[k] for b in batches]).numpy() for k in names}


@pytest.mark.parametrize("resident", [False, True])
def test_epoch_stream_yields_what_fresh_streams_yield(tmp_path, resident):
    """One reader across epochs gives every epoch the batches a stream of its own gives,
    which are the in-memory rows at the order's (sample, view) pairs."""
    g, data = _group(tmp_path / "t.zarr")
    n, V = data["logits"].shape[:2]
    names = ["logits", "L1"]
    kw = {"chunk_rows": 10, "window": 2,
          "resident": {"logits": torch.from_numpy(data["logits"])} if resident else None}

    def order_of(e):
        return chunk_order(n, e, 5, V, 10, 2)

    with EpochStream(g, names, order_of, 16, epochs=4, **kw) as stream:
        for epoch in range(4):
            got = list(stream.epoch(epoch))
            fresh = list(TargetStream(g, names, order_of(epoch), 16, **kw))
            assert [len(b["L1"]) for b in got] == [len(b["L1"]) for b in fresh]
            o = stream.order(epoch)
            np.testing.assert_array_equal(o, order_of(epoch))
            for k, out in _arrays(got, names).items():
                np.testing.assert_array_equal(_bits(out), _bits(_arrays(fresh, names)[k]))
                np.testing.assert_array_equal(_bits(out), _bits(data[k][o[:, 0], o[:, 1]]))
    assert _stream_threads() == []


def test_epoch_stream_reads_the_next_epoch_ahead_within_its_slots(tmp_path, monkeypatch,
                                                                   request):
    g, data = _group(tmp_path / "t.zarr", n=100)
    calls = []
    real = EpochStream._read

    def counted(self, tag, order, start, *a):
        calls.append((tag, start))
        return real(self, tag, order, start, *a)

    monkeypatch.setattr(EpochStream, "_read", counted)
    for prefetch in (1, 2):
        calls.clear()
        stream = EpochStream(g, ["L1"], lambda e: chunk_order(100, e, 0, 3, 10, 1), 5,
                             epochs=3, chunk_rows=10, window=1, prefetch=prefetch)
        it = stream.epoch(0)
        request.addfinalizer(stream.close)  # on a failed assertion too
        batches = [next(it) for _ in range(20)]  # the whole epoch, the generator left open
        assert sum(len(b["L1"]) for b in batches) == 100
        time.sleep(0.5)  # ample time for the reader to run ahead as far as it may
        # the last batch is out: its window's slot is free, so every slot holds epoch 1
        first = [c for c in calls if c[0] == 1]
        assert len(calls) == 10 + prefetch + 1 and first[0] == (1, 0)
        assert len(first) == prefetch + 1  # no further than the slots allow
        it.close()  # the epoch was complete: the reader carries on
        assert len(_stream_threads()) > 0
        second = list(stream.epoch(1))  # served from the read-ahead, not read again
        assert sum(len(b["L1"]) for b in second) == 100
        assert [c for c in calls if c[0] == 1] == [(1, s) for s in range(0, 100, 10)]
        assert len([c for c in calls if c[0] == 2]) <= prefetch + 1
        stream.close()
        assert _stream_threads() == []
    # the epochs bound: after the last epoch nothing more is read
    calls.clear()
    with EpochStream(g, ["L1"], lambda e: chunk_order(100, e, 0, 3, 10, 1), 5, epochs=1,
                     chunk_rows=10, window=1) as stream:
        list(stream.epoch(0))
        time.sleep(0.3)
        assert {tag for tag, _ in calls} == {0}


def test_epoch_stream_restarts_after_an_epoch_left_early(tmp_path):
    g, data = _group(tmp_path / "t.zarr")
    n, V = data["L1"].shape[:2]

    def order_of(e):
        return chunk_order(n, e, 2, V, 10, 1)

    def ref(e):
        o = order_of(e)
        return data["L1"][o[:, 0], o[:, 1]]

    with EpochStream(g, ["L1"], order_of, 8, epochs=5, chunk_rows=10, window=1) as stream:
        for _ in stream.epoch(0):  # left after one batch: the reader is stopped
            break
        assert _stream_threads() == []
        # the same epoch again, then a jump (a resumed run), then one past the epochs the
        # reader reads ahead to: fresh readers, right rows
        for e in (0, 3, 4, 6):
            out = _arrays(list(stream.epoch(e)), ["L1"])["L1"]
            np.testing.assert_array_equal(_bits(out), _bits(ref(e)))
    assert _stream_threads() == []


def test_epoch_stream_passes_over_an_empty_epoch(tmp_path):
    """A rank's share of an epoch may be empty (fewer samples than ranks): nothing is
    yielded and the reader carries on into the next epoch."""
    g, data = _group(tmp_path / "t.zarr")
    n, V = data["L1"].shape[:2]

    def order_of(e):
        return np.empty((0, 2), np.int64) if e == 1 else chunk_order(n, e, 2, V, 10, 1)

    with EpochStream(g, ["L1"], order_of, 8, epochs=3, chunk_rows=10, window=1) as stream:
        assert len(list(stream.epoch(0))) == -(-n // 8)
        assert list(stream.epoch(1)) == []
        reader = stream._reader
        o = order_of(2)
        out = _arrays(list(stream.epoch(2)), ["L1"])["L1"]
        assert stream._reader is reader  # the same reader throughout
        np.testing.assert_array_equal(_bits(out), _bits(data["L1"][o[:, 0], o[:, 1]]))
    assert _stream_threads() == []


@pytest.mark.parametrize("reader", ["direct", "zarr-python"])
def test_a_streamed_epoch_reads_one_view_of_each_chunk_from_disk(tmp_path, monkeypatch, reader):
    """Through the real store: chunks of one view each, so an epoch fetches each chunk's
    bytes in one view only, 1/V of the array, where whole rows fetch all of it. Both
    readers: mlfd.cache.shards' direct one, and zarr-python's where it does not apply."""
    from zarr.storage import LocalStore

    from mlfd.cache import shards, stream

    monkeypatch.setattr(layout, "CHUNK_BYTES", 512)  # 4 rows of a view per chunk
    monkeypatch.setattr(layout, "SHARD_BYTES", 512 * 4 * 4)  # 4 chunk rows per shard
    n, V = 64, 4
    values = np.random.default_rng(0).standard_normal((n, V, 8, 4, 2)).astype(np.float16)
    group = CacheGroup(tmp_path / "t", {"x": 1})
    w = group.begin({"L1": (values.shape, "float16"), "labels": ((n,), "int64")})
    w.append("labels", np.zeros(n, np.int64))
    w.append("L1", values)
    w.close()
    zg = group.open_read()
    R = zg["L1"].chunks[0]
    assert zg["L1"].chunks == (R, 1, 8, 4, 2) and R == 4
    assert zg["L1"].shards == (16, V, 8, 4, 2)
    shard_bytes = sum(p.stat().st_size for p in (group.path / "L1" / "c").rglob("*")
                      if p.is_file())
    fetched = []
    real = LocalStore.get

    async def get(self, key, prototype, byte_range=None):
        buf = await real(self, key, prototype, byte_range)
        if key.startswith("L1/c/"):
            fetched.append((key, byte_range, 0 if buf is None else len(buf)))
        return buf

    monkeypatch.setattr(LocalStore, "get", get)
    real_chunk = shards.ShardArray._chunk

    def chunk(self, fd, entry, dest, where):  # the direct reader's one read per chunk
        fetched.append((where, range(int(entry[0]), int(entry[0]) + int(entry[1])),
                        int(entry[1])))
        return real_chunk(self, fd, entry, dest, where)

    monkeypatch.setattr(shards.ShardArray, "_chunk", chunk)
    if reader == "zarr-python":
        monkeypatch.setattr(stream, "for_array", lambda arr: None)
    for epoch in range(3):
        fetched.clear()
        order = chunk_order(n, epoch, 0, V, R, 2)
        out = _arrays(list(TargetStream(zg, ["L1"], order, 8, chunk_rows=R, window=2)), ["L1"])
        np.testing.assert_array_equal(_bits(out["L1"]), _bits(values[order[:, 0], order[:, 1]]))
        # chunk payloads (byte ranges) apart from shard indexes (suffix reads)
        ranged = [(k, (r.start, r.stop if isinstance(r, range) else r.end))
                  for k, r, _ in fetched if hasattr(r, "start")]
        assert len(ranged) == len(set(ranged)) == n // R  # each chunk once, one view
        data_bytes = sum(size for _, r, size in fetched if hasattr(r, "start"))
        assert data_bytes < 1.5 * shard_bytes / V
    fetched.clear()
    monkeypatch.setattr(shards, "for_array", lambda arr: None)
    zg["L1"][...]  # whole rows, for comparison: every view's bytes
    assert sum(size for *_, size in fetched) >= 0.95 * shard_bytes


def _damage_middle_chunk(array_dir):
    files = sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())
    p = files[len(files) // 2]
    b = bytearray(p.read_bytes())
    mid = len(b) // 2 - 8
    b[mid:mid + 16] = bytes(x ^ 0xFF for x in b[mid:mid + 16])
    p.write_bytes(bytes(b))


def test_damaged_chunk_surfaces_as_one_line_corrupt_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "CHUNK_BYTES", 128)  # a few rows per chunk: many chunks
    rng = np.random.default_rng(0)
    n, V = 60, 2
    logits = rng.standard_normal((n, V, 8)).astype(np.float16)
    group = CacheGroup(tmp_path / "targets" / "d" / "train", {"x": 1})
    w = group.begin({"logits": (logits.shape, "float16"), "labels": ((n,), "int64")})
    w.append("labels", np.zeros(n, np.int64))
    w.append("logits", logits)
    w.close()
    zg = group.open_read()  # checked while intact, damaged afterwards
    rows = zg["logits"].chunks[0]
    assert n // rows >= 4
    _damage_middle_chunk(group.path / "logits")
    # each epoch reads one view of each chunk: within a few, the damaged one is read (the
    # reader carried across epochs hands its error on like a single pass)
    stream = EpochStream(zg, ["logits"], lambda e: chunk_order(n, e, 0, V, rows, 1), 4,
                         chunk_rows=rows, window=1, hint=group._rebuild_hint)
    batches = 0
    with stream, pytest.raises(CorruptArtifact) as e:
        for epoch in range(8):
            order, seen = stream.order(epoch), 0
            for b in stream.epoch(epoch):
                ref = logits[order[seen:seen + len(b["logits"]), 0],
                             order[seen:seen + len(b["logits"]), 1]]
                np.testing.assert_array_equal(_bits(b["logits"].numpy()), _bits(ref))
                seen += len(b["logits"])
                batches += 1
    assert batches > 0  # intact chunks came through first
    msg = str(e.value)
    assert "\n" not in msg and str(group.path) in msg
    assert "corrupt: array logits failed to decode" in msg and "re-run `mlfd cache`" in msg
    assert e.value.exit_code == 2
    assert _stream_threads() == []


def test_sizes_parse_and_print():
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1KiB") == parse_size("1k") == 1024
    assert parse_size("123456") == 123456
    for text in ("", "x", "0", "-1", "4 GiBs", "1e9", "GiB", "0.5"):
        with pytest.raises(MlfdError, match="--cache-memory"):
            parse_size(text)
    assert format_size(int(12.3 * 2**30)) == "12.3 GiB"
    assert format_size(4 << 30) == "4.0 GiB" and format_size(1024) == "1.0 KiB"
    assert format_size(100) == "100 B"


# --------------------------------------------------------------------------- distill


def test_streamed_batches_pair_images_with_their_targets(ws):
    """The pipeline and the stream slice one order alike: every batch's (index, view)
    rows of the loaded cache are the targets streamed beside it."""
    from mlfd.stages.cache import view_augment
    from mlfd.stages.common import RunOptions, input_spec, pipeline_for
    from mlfd.stages.distill import _with_targets
    from mlfd.stages.targets import target_group
    from mlfd.workspace import Workspace

    w = Workspace.open(ws)
    group = target_group(w, 2, "alpha")
    loaded = group.load()
    n, V = loaded["logits"].shape[:2]
    names = ["logits", "L1", "L2"]
    order = chunk_order(n, 0, w.exp.seed, V, 8, 2)
    opts = RunOptions(device=torch.device("cpu"), pipeline="torch")
    pipe = pipeline_for(w, opts, "alpha", "train", input_spec(w, "alpha"), order, 10,
                        view_augment(w, "alpha"))
    stream = TargetStream(group.open_read(), names, order, 10, chunk_rows=8, window=2)
    seen = 0
    for b, t in _with_targets(pipe, stream):
        np.testing.assert_array_equal(b.index.numpy(), order[seen:seen + len(b), 0])
        np.testing.assert_array_equal(b.view.numpy(), order[seen:seen + len(b), 1])
        for k in names:
            ref = loaded[k][b.index.numpy(), b.view.numpy()]
            np.testing.assert_array_equal(_bits(t[k].numpy()), _bits(ref))
        seen += len(b)
    assert seen == n


def _fingerprint(ws):
    return json.loads((ws / "students/alpha/L2/last.json").read_text())["fingerprint"]


def test_distill_streams_when_targets_exceed_cache_memory(ws, capsys):
    before = _fingerprint(ws)
    assert not any(k.startswith("order.") for k in before)
    args = ("distill", "--workdir", ws, "--dataset", "alpha", "--levels", 2, *LOCAL, "--json")

    # a budget below the targets: streamed, retrained (the order is part of the fingerprint)
    code, out, err = run(capsys, *args, "--cache-memory", "1KiB")
    assert code == 0, err
    steps = json.loads(out)["steps"]
    assert [(s["verb"], s["target"]) for s in steps] == [("distill", "alpha L2")]
    assert "order.kind <absent> → chunk-shuffled" in steps[0]["reason"]
    line = next(ln for ln in err.splitlines() if "streaming" in ln)
    assert "> cache memory 1.0 KiB: streaming chunk-shuffled windows of 1 chunks" in line
    fp = _fingerprint(ws)
    rows = zarr.open_group(str(ws / "cache/targets-L2.zarr/alpha/train"), mode="r")
    chunk_rows = max(rows[k].chunks[0] for k in ("logits", "L1", "L2"))
    assert (fp["order.kind"], fp["order.window"], fp["order.chunk_rows"],
            fp["order.views"]) == ("chunk-shuffled", 1, chunk_rows, "per-chunk")
    assert {k: v for k, v in fp.items() if not k.startswith("order.")} == before
    assert (ws / "students/alpha/L2/last.safetensors").exists()

    # the same budget: up to date, in the plan (dry run) and in the run
    code, out, err = run(capsys, *args, "--cache-memory", "1KiB", "--dry-run")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["steps"] == [] and ("distill", "alpha L2") in {
        (s["verb"], s["target"]) for s in doc["reused"]}
    code, out, err = run(capsys, *args, "--cache-memory", "1KiB")
    assert code == 0, err
    assert json.loads(out)["steps"] == [] and "streaming" not in err
    # read-only views judge the student by the order it was trained with
    code, out, err = run(capsys, "list", "--root", ws.parent, "--json")
    assert code == 0, err
    stages = json.loads(out)["experiments"][0]["stages"]
    assert next(s for s in stages if s["target"] == "alpha L2")["status"] == "complete"

    # the default budget holds these targets in memory: a different order, so retrained
    code, out, err = run(capsys, *args)
    assert code == 0, err
    steps = json.loads(out)["steps"]
    assert [(s["verb"], s["target"]) for s in steps] == [("distill", "alpha L2")]
    assert "order.kind chunk-shuffled → <absent>" in steps[0]["reason"]
    assert "streaming" not in err
    assert _fingerprint(ws) == before


def test_streamed_distill_reads_each_next_epoch_ahead(ws, capsys, monkeypatch):
    """Two streamed epochs: the student trains, epoch 1's first window is read before
    epoch 1 asks for it, the reader is gone afterwards (the autouse check), and the same
    run again is up to date."""
    events = []
    read, epoch = EpochStream._read, EpochStream.epoch

    def recorded_read(self, tag, order, start, *a):
        events.append(("read", tag, start))
        return read(self, tag, order, start, *a)

    def recorded_epoch(self, e):
        if e > 0:  # read ahead while epoch e - 1 ended (its last step, the evaluation)
            for _ in range(100):
                if ("read", e, 0) in events:
                    break
                time.sleep(0.05)
        events.append(("epoch", e))
        return epoch(self, e)

    monkeypatch.setattr(EpochStream, "_read", recorded_read)
    monkeypatch.setattr(EpochStream, "epoch", recorded_epoch)
    edit_experiment(ws, "distill", epochs=2)  # the student's only: upstream stays done
    args = ("distill", "--workdir", ws, "--dataset", "alpha", "--levels", 2, *LOCAL, "--json",
            "--cache-memory", "1KiB")
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "streaming chunk-shuffled" in err
    assert [(s["verb"], s["target"]) for s in json.loads(out)["steps"]] == [
        ("distill", "alpha L2")]
    assert events.index(("read", 1, 0)) < events.index(("epoch", 1))
    assert ("read", 2, 0) not in events  # nothing past the last epoch
    meta = json.loads((ws / "students/alpha/L2/last.json").read_text())
    assert (meta["epoch"], meta["complete"]) == (2, True)
    assert np.isfinite(meta["metrics"]["train_loss"]) and meta["metrics"]["train_loss"] > 0
    assert meta["fingerprint"]["order.views"] == "per-chunk"
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert json.loads(out)["steps"] == []


@pytest.mark.parametrize("size", ["lots", "0", "-5MiB", "1.5X"])
def test_bad_cache_memory_is_one_error_line(ws, capsys, size):
    line = bad(capsys, "distill", "--workdir", ws, "--dataset", "alpha", *LOCAL,
               "--cache-memory", size)
    assert "--cache-memory" in line and "512MiB" in line
