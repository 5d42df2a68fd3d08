"""Streaming target caches: chunk-shuffled orders, the windowed reader, and `mlfd distill`
choosing between targets in memory and streamed ones by --cache-memory."""

import json
import threading
import time

import numpy as np
import pytest
import torch
import zarr
from helpers import LOCAL, bad, run

from mlfd.cache import CacheGroup, store
from mlfd.cache.stream import TargetStream, format_size, order_windows, parse_size
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
def test_chunk_order_is_a_permutation_of_windows_with_train_order_views(n, R, W):
    V, seed = 4, 11
    for epoch in (0, 1, 2):
        o = chunk_order(n, epoch, seed, V, R, W)
        assert o.dtype == np.int64 and o.shape == (n, 2)
        assert sorted(o[:, 0].tolist()) == list(range(n))
        # the view of a sample is the one train_order gives it in the same epoch
        ref = dict(train_order(n, epoch, seed, V).tolist())
        assert [ref[i] for i in o[:, 0].tolist()] == o[:, 1].tolist()
        assert ((o[:, 1] >= 0) & (o[:, 1] < V)).all()
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
        g.create_array(k, shape=v.shape, chunks=(rows[k], *v.shape[1:]), dtype=v.dtype)[...] = v
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

            def __getitem__(self, sl):
                reads.append((name, sl.start, min(sl.stop, arr.shape[0])))
                return arr[sl]

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
    read = {k: sum(hi - lo for name, lo, hi in spy.reads if name == k) for k in names}
    if kind != "shuffled":  # each window's chunks are decoded once: n rows read per array
        assert read == ({"logits": 0, "L1": n} if resident else {"logits": n, "L1": n})
    assert "labels" not in {name for name, _, _ in spy.reads}


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
    # L1 is read in windows of its 7-row chunks, two windows within the 9887 B left:
    # 4943 // (7 * 96) = 7 chunks, rounded down to a power of two
    feed = feed_of(g, total - 1)
    assert (feed.streaming, feed.resident, feed.chunk_rows, feed.window) == (
        True, ("logits",), 7, 4)
    assert feed.fingerprint() == {"order.kind": "chunk-shuffled", "order.window": 4,
                                  "order.chunk_rows": 7}
    # nothing fits: both arrays streamed, chunks of the larger chunk rows, one per window
    feed = feed_of(g, 1)
    assert (feed.resident, feed.chunk_rows, feed.window) == ((), 10, 1)


def test_stream_reads_ahead_at_most_prefetch_windows(tmp_path, monkeypatch):
    g, data = _group(tmp_path / "t.zarr", n=100)
    order = chunk_order(100, 0, 0, 3, 10, 1)  # ten windows of one chunk
    calls = []
    real = TargetStream._read

    def counted(self, *a):
        calls.append(a[0])
        return real(self, *a)

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


def _damage_middle_chunk(array_dir):
    files = sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())
    p = files[len(files) // 2]
    b = bytearray(p.read_bytes())
    mid = len(b) // 2 - 8
    b[mid:mid + 16] = bytes(x ^ 0xFF for x in b[mid:mid + 16])
    p.write_bytes(bytes(b))


def test_damaged_chunk_surfaces_as_one_line_corrupt_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "CHUNK_BYTES", 256)  # a few rows per chunk: many chunks
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
    order = chunk_order(n, 0, 0, V, rows, 1)
    stream = TargetStream(zg, ["logits"], order, 4, chunk_rows=rows, window=1,
                          hint=group._rebuild_hint)
    seen = 0
    with pytest.raises(CorruptArtifact) as e:
        for b in stream:
            ref = logits[order[seen:seen + len(b["logits"]), 0],
                         order[seen:seen + len(b["logits"]), 1]]
            np.testing.assert_array_equal(_bits(b["logits"].numpy()), _bits(ref))
            seen += len(b["logits"])
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
    from mlfd.stages.cache import target_group, view_augment
    from mlfd.stages.common import RunOptions, input_spec, pipeline_for
    from mlfd.stages.distill import _with_targets
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
    assert (fp["order.kind"], fp["order.window"], fp["order.chunk_rows"]) == (
        "chunk-shuffled", 1, chunk_rows)
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


@pytest.mark.parametrize("size", ["lots", "0", "-5MiB", "1.5X"])
def test_bad_cache_memory_is_one_error_line(ws, capsys, size):
    line = bad(capsys, "distill", "--workdir", ws, "--dataset", "alpha", *LOCAL,
               "--cache-memory", size)
    assert "--cache-memory" in line and "512MiB" in line
