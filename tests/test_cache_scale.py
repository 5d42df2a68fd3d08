"""Cache layout for scale: shards, codecs and dtypes, fsspec locations, cheap re-checks."""

import json
import os
import time

import fsspec
import numpy as np
import pytest
import torch
import yaml
from helpers import LOCAL, bad, edit_experiment, run

from mlfd.cache import (
    BOOKKEEPING,
    MANIFEST,
    VERIFIED,
    CacheGroup,
    integrity,
    layout,
    to_tensor,
)
from mlfd.config import CODECS, Experiment
from mlfd.errors import CorruptArtifact, MlfdError, StaleCacheError
from mlfd.storage.staging import set_read_only


@pytest.fixture
def small_shards(monkeypatch):
    """64-byte chunks, 16 per shard: small arrays span many chunks and several shards."""
    monkeypatch.setattr(layout, "CHUNK_BYTES", 64)
    monkeypatch.setattr(layout, "SHARD_BYTES", 64 * 16)


@pytest.fixture
def memfs():
    """A fresh in-memory filesystem (fsspec's is one per process)."""
    fs = fsspec.filesystem("memory")
    root = f"/t{time.monotonic_ns()}"
    yield fs, f"memory:/{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _data(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return {"feat": rng.standard_normal((n, 4)).astype(np.float32),  # 4 rows/chunk, 64/shard
            "labels": rng.integers(0, 10, n)}  # 8 rows/chunk, 128/shard


def _write(where, d, fp=None, batch=7, **kw):
    g = CacheGroup(where, fp or {"x": 1}, **kw)
    w = g.begin({k: (v.shape, v.dtype.name) for k, v in d.items()})
    for k, v in d.items():
        for s in range(0, len(v), batch):
            w.append(k, v[s:s + batch])
    w.close()
    return g


def _shard_files(root, array):
    return sorted(p.relative_to(root).as_posix() for p in (root / array / "c").rglob("*")
                  if p.is_file())


# --------------------------------------------------------------------------- shards


def test_whole_shards_only_and_few_files(tmp_path, small_shards, monkeypatch):
    from mlfd.cache.writer import CacheWriter

    d = _data()
    writes = []
    original = CacheWriter._write

    def record(self, name, start, stop, values):  # every write of rows, whichever path
        writes.append((name, start, stop))
        return original(self, name, start, stop, values)

    monkeypatch.setattr(CacheWriter, "_write", record)
    g = _write(tmp_path / "g", d)
    out = g.load()
    np.testing.assert_array_equal(out["feat"], d["feat"])
    np.testing.assert_array_equal(out["labels"], d["labels"])
    # 250 inner chunks of `feat` live in 16 shard files (64 rows each, the last one 40)
    assert set(_shard_files(g.path, "feat")) == {f"feat/c/{i}/0" for i in range(16)}
    assert len(_shard_files(g.path, "labels")) == 8
    # every write covers whole shards, the last one ending at the array's end
    for name, step in (("feat", 64), ("labels", 128)):
        spans = [(a, b) for n, a, b in writes if n == name]
        assert spans[0][0] == 0 and spans[-1][1] == 1000
        assert all(a % step == 0 and (b % step == 0 or b == 1000) for a, b in spans)
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # none rewritten


def test_a_million_rows_are_a_handful_of_files(tmp_path):
    """Real sizes: 1M rows of 8 fp16 values (16 MiB) are 16 ~1 MiB chunks in one shard."""
    n = 1_000_000
    feat = (np.arange(n * 8) % 251).astype(np.float16).reshape(n, 8)
    g = _write(tmp_path / "g", {"feat": feat}, batch=300_000)
    files = [p for p in g.path.rglob("*") if p.is_file()]
    assert len(files) <= 5, files  # group + array zarr.json, one shard, manifest (+ memo)
    arr = g.open_read()["feat"]
    assert arr.chunks == (65536, 8) and arr.shards == (65536 * 16, 8)
    np.testing.assert_array_equal(g.load()["feat"], feat)


def test_flipped_byte_in_a_shard_is_refused_on_read(tmp_path, small_shards):
    d = _data()
    g = _write(tmp_path / "g", d)
    shard = g.path / "feat" / "c" / "5" / "0"
    b = bytearray(shard.read_bytes())
    b[40] ^= 0x01  # one bit inside the shard's first inner chunk
    shard.write_bytes(bytes(b))
    assert g.reason() == "corrupt: feat/c/5/0 checksum mismatch"
    # with a manifest rewritten to match, the inner chunk's crc32c still refuses it
    (g.path / MANIFEST).write_text(json.dumps({"files": integrity._manifest(g.path)}))
    assert g.status() == "ok"
    with pytest.raises(CorruptArtifact, match="array feat failed to decode"):
        g.load()
    np.testing.assert_array_equal(g.open_read()["feat"][:320], d["feat"][:320])  # shards 0-4


# --------------------------------------------------------------------------- codecs, dtypes


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_round_trip_and_compress(tmp_path, codec):
    n = 20_000
    rng = np.random.default_rng(0)
    # compressible: few distinct values, as quantised activations are
    feat = rng.integers(0, 4, (n, 16)).astype(np.float32)
    g = _write(tmp_path / codec, {"feat": feat}, batch=5000, codec=codec, clevel=3)
    np.testing.assert_array_equal(g.load()["feat"], feat)
    inner = g.open_read()["feat"].metadata.codecs[0].to_dict()["configuration"]["codecs"]
    names = [c["name"] for c in inner]
    assert names == (["bytes", "crc32c"] if codec == "none" else ["bytes", "blosc", "crc32c"])
    if codec != "none":
        assert inner[1]["configuration"]["cname"] == codec
        assert inner[1]["configuration"]["clevel"] == 3
    on_disk = sum(p.stat().st_size for p in (g.path / "feat" / "c").rglob("*") if p.is_file())
    if codec == "none":
        assert on_disk >= feat.nbytes  # the values plus 4 bytes of crc32c per chunk
    else:
        assert on_disk < feat.nbytes / 2, (codec, on_disk)


def test_codec_and_level_are_checked(tmp_path):
    with pytest.raises(MlfdError, match="cache.codec 'gzip': choose zstd, lz4, none"):
        CacheGroup(tmp_path / "g", {}, codec="gzip")
    with pytest.raises(MlfdError, match="cache.clevel must be an integer from 0 to 9, got 12"):
        CacheGroup(tmp_path / "g", {}, clevel=12)


def test_resume_needs_the_same_codec(tmp_path, small_shards):
    d = _data()
    w = CacheGroup(tmp_path / "g", {"x": 1}).begin({"feat": (d["feat"].shape, "float32")})
    w.append("feat", d["feat"][:300])
    assert w.cursor("feat") == 256
    same = CacheGroup(tmp_path / "g", {"x": 1}).begin({"feat": (d["feat"].shape, "float32")})
    assert same.cursor("feat") == 256
    other = CacheGroup(tmp_path / "g", {"x": 1}, codec="lz4")
    assert other.begin({"feat": (d["feat"].shape, "float32")}).cursor("feat") == 0


def test_bfloat16_is_rounded_as_torch_rounds(tmp_path, small_shards):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 2, 3)) * 100).astype(np.float32)
    g = CacheGroup(tmp_path / "g", {"x": 1})
    w = g.begin({"feat": (x.shape, "bfloat16"), "labels": ((300,), "int64")})
    w.append("labels", np.arange(300))
    w.append("feat", x[:100])  # numpy float32
    w.append("feat", torch.from_numpy(x[100:200]))  # a float32 tensor
    w.append("feat", torch.from_numpy(x[200:]).to(torch.bfloat16))  # already bfloat16
    w.close()
    assert g.dtypes() == {"feat": "bfloat16", "labels": "int64"}
    out = g.load()
    assert out["feat"].dtype == np.uint16  # the bit patterns: numpy has no bfloat16
    want = torch.from_numpy(x).to(torch.bfloat16)
    got = to_tensor(out["feat"], "bfloat16")
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    t = g.tensors(out)
    assert torch.equal(t["feat"], want) and torch.equal(t["labels"], torch.arange(300))
    assert not torch.equal(want.float(), torch.from_numpy(x))  # it did round
    # and a bfloat16 group reads back into another unchanged (bit patterns pass through)
    h = _write(tmp_path / "h", {"feat": out["feat"]}, fp={"y": 1})
    assert h.dtypes() == {"feat": "uint16"}
    with pytest.raises(MlfdError, match="stored as uint16"):
        to_tensor(x, "bfloat16")


# --------------------------------------------------------------------------- fsspec locations


def test_file_url_is_the_local_path(tmp_path, small_shards):
    d = _data()
    g = _write(f"file://{tmp_path}/c.zarr/d/train", d)
    assert g.fs is None and g.path == tmp_path / "c.zarr" / "d" / "train"
    ref = _write(tmp_path / "ref", d)
    for k in d:
        np.testing.assert_array_equal(g.load()[k], ref.load()[k])
    assert CacheGroup(f"file://{tmp_path}/c.zarr/d/train", {"x": 1}).status() == "ok"


def test_memory_url_round_trip_stale_and_corrupt(tmp_path, memfs, small_shards):
    fs, url = memfs
    d = _data()
    g = _write(f"{url}/c.zarr/d/train", d)
    ref = _write(tmp_path / "ref", d)
    assert g.fs is not None and g.location == f"{url}/c.zarr/d/train"
    assert not fs.exists(f"{g.staging}") and fs.exists(f"{g.path}/{MANIFEST}")
    out = g.load()
    for k in d:
        np.testing.assert_array_equal(out[k], ref.load()[k])
    assert (g.status(), g.reason()) == ("ok", "ok")
    assert g.nbytes() == sum(i["size"] for i in fs.find(str(g.path), detail=True).values())
    fresh = CacheGroup(f"{url}/c.zarr/d/train", {"x": 2})
    assert fresh.reason() == "stale: x 1 → 2"
    with pytest.raises(StaleCacheError, match=f"cache {url}/c.zarr/d/train: stale"):
        fresh.load()
    shard = f"{g.path}/feat/c/3/0"
    b = bytearray(fs.cat_file(shard))
    b[len(b) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(b))
    assert g.reason() == "corrupt: feat/c/3/0 checksum mismatch"
    with pytest.raises(CorruptArtifact, match="feat/c/3/0 checksum mismatch"):
        g.load()
    fs.pipe_file(f"{g.path}/zarr.json", fs.cat_file(f"{g.path}/zarr.json")[:50])
    assert g.reason() == "corrupt: zarr.json unreadable"
    # rebuilt in place, as `mlfd cache` does without --force
    g = _write(f"{url}/c.zarr/d/train", d)
    assert g.status() == "ok"
    np.testing.assert_array_equal(g.load()["feat"], d["feat"])


def test_memory_url_resumes_at_a_shard(memfs, small_shards):
    fs, url = memfs
    d = _data()
    g = CacheGroup(f"{url}/g", {"x": 1})
    w = g.begin({"feat": (d["feat"].shape, "float32")})
    w.append("feat", d["feat"][:300])
    del w  # killed
    fs.pipe_file(f"{g.staging}/feat/c/4/0", b"torn by the kill")  # past the cursor (256)
    assert g.status() == "missing"
    w = g.begin({"feat": (d["feat"].shape, "float32")})
    assert w.cursor("feat") == 256
    w.append("feat", d["feat"][256:], start=256)
    w.close()
    np.testing.assert_array_equal(g.load()["feat"], d["feat"])


def _close_killed_at(w, kill_at: int, copies: int, monkeypatch) -> None:
    """close() with a kill before copy number ``kill_at`` (``copies``: before the staging
    group is deleted, every copy done)."""
    done = {"n": 0}
    copy, remove = layout._RemoteDir.copy_to, layout._RemoteDir.remove

    def killed_copy(self, rel, other):
        if done["n"] == kill_at:
            raise KeyboardInterrupt
        done["n"] += 1
        copy(self, rel, other)

    def killed_remove(self):
        if done["n"] == kill_at == copies and self.path.endswith(".partial"):
            raise KeyboardInterrupt
        remove(self)

    with monkeypatch.context() as m:
        m.setattr(layout._RemoteDir, "copy_to", killed_copy)
        m.setattr(layout._RemoteDir, "remove", killed_remove)
        with pytest.raises(KeyboardInterrupt):
            w.close()


def test_object_store_promotion_is_never_half_ok(memfs, small_shards, monkeypatch):
    """Copy-then-delete: a kill at any copy leaves a group that is not 'ok' (even to a
    read-only reader), and the next writer run finishes the promotion."""
    fs, url = memfs
    old, new = _data(200, seed=1), _data(200, seed=2)  # 4 + 2 shards
    copies = len(fs.find(str(_write(f"{url}/probe", new).path)))  # each file, manifest last
    for kill_at in range(copies + 1):
        where = f"{url}/g{kill_at}"
        _write(where, old)
        g = CacheGroup(where, {"x": 1})
        w = g.begin({k: (v.shape, v.dtype.name) for k, v in new.items()})
        for k, v in new.items():
            w.append(k, v)
        _close_killed_at(w, kill_at, copies, monkeypatch)
        set_read_only(True)
        try:
            state = g.status()
            assert kill_at == copies or state != "ok", kill_at
        finally:
            set_read_only(False)
        assert g.status() == "ok" and not fs.exists(str(g.staging))  # recovered
        np.testing.assert_array_equal(g.load()["feat"], new["feat"])


def test_bad_urls_are_one_line(tmp_path):
    with pytest.raises(MlfdError, match=r"fsspec has no filesystem for 's3' \(pip install s3fs\)"):
        CacheGroup("s3://bucket/cache/g", {})
    with pytest.raises(MlfdError, match="fsspec has no filesystem for 'nope'"):
        CacheGroup("nope://bucket/cache/g", {})


# --------------------------------------------------------------------------- cheap re-checks


@pytest.fixture
def reads(monkeypatch):
    """rel path -> bytes read to checksum it, per status() call."""
    seen = {}
    original = integrity._file_crc

    def counting(d, rel):
        seen[rel] = seen.get(rel, 0) + len(d.read(rel))
        return original(d, rel)

    monkeypatch.setattr(integrity, "_file_crc", counting)
    return seen


def _age(root, seconds=3600):
    past = time.time() - seconds
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (past, past))


def test_second_status_reads_no_chunk_data(tmp_path, small_shards, reads):
    d = _data()
    g = _write(tmp_path / "g", d)
    _age(g.path)  # written long ago: its mtimes prove something
    reads.clear()  # of the manifest, at close
    assert g.status() == "ok"
    total = sum(p.stat().st_size for p in g.path.rglob("*")
                if p.is_file() and p.name not in BOOKKEEPING)
    assert sum(reads.values()) == total  # the first check reads every byte
    assert (g.path / VERIFIED).exists()
    reads.clear()
    for _ in range(3):
        assert g.status() == "ok"
    assert reads == {}  # nothing re-read
    # a file whose stat changed is read again, and only it
    os.utime(g.path / "feat/c/2/0", (time.time() - 60, time.time() - 60))
    assert g.status() == "ok" and list(reads) == ["feat/c/2/0"]
    reads.clear()
    assert g.status() == "ok" and reads == {}
    # damage is still caught: a rewrite moves the mtime
    shard = g.path / "feat/c/7/0"
    b = bytearray(shard.read_bytes())
    b[30] ^= 0xFF
    shard.write_bytes(bytes(b))
    assert g.reason() == "corrupt: feat/c/7/0 checksum mismatch" and list(reads) == ["feat/c/7/0"]


def test_fresh_files_are_rechecked_until_their_mtime_settles(tmp_path, small_shards, reads):
    """A file modified just before its check could change again within the same clock tick
    without its mtime moving: it is not trusted until it is RACY_NS old."""
    g = _write(tmp_path / "g", _data())
    reads.clear()
    assert g.status() == "ok" and reads
    reads.clear()
    assert g.status() == "ok" and reads  # just written: read again
    memo = g.path / VERIFIED
    assert not memo.exists() or not json.loads(memo.read_text())["files"]


def test_memo_needs_the_same_manifest_and_a_writer(tmp_path, small_shards, reads):
    g = _write(tmp_path / "g", _data())
    _age(g.path)
    set_read_only(True)  # eval, --dry-run: they write nothing, not even the memo
    try:
        assert g.status() == "ok" and not (g.path / VERIFIED).exists()
    finally:
        set_read_only(False)
    assert g.status() == "ok" and (g.path / VERIFIED).exists()
    files = len(json.loads((g.path / MANIFEST).read_text())["files"])
    reads.clear()
    manifest = g.path / MANIFEST
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), id="another")))
    assert g.status() == "ok" and len(reads) == files  # all again


def test_remote_second_status_reads_nothing(memfs, small_shards, reads, monkeypatch):
    monkeypatch.setattr(layout, "RACY_NS", 0)  # memory:// times are microseconds, just now
    fs, url = memfs
    g = _write(f"{url}/g", _data())
    reads.clear()
    assert g.status() == "ok" and len(reads) == len(g._dir(g.path).files())
    reads.clear()
    assert g.status() == "ok" and reads == {}
    shard = f"{g.path}/labels/c/1"
    b = bytearray(fs.cat_file(shard))
    b[20] ^= 0xFF
    fs.pipe_file(shard, bytes(b))
    assert g.reason() == "corrupt: labels/c/1 checksum mismatch" and list(reads) == ["labels/c/1"]


# --------------------------------------------------------------------------- experiment, CLI


@pytest.mark.parametrize("key,value,message", [
    ("codec", "gzip", "cache.codec 'gzip': choose zstd, lz4, none"),
    ("clevel", 10, "cache.clevel must be an integer from 0 to 9, got 10"),
    ("dtype", "int4", "cache.dtype 'int4': choose float16, bfloat16, float32, int8"),
    ("uri", "s3://bucket/x", "cache.uri 's3://bucket/x': fsspec has no filesystem for 's3' "
                             "(pip install s3fs)"),
])
def test_experiment_rejects_bad_cache_values(finished, key, value, message):
    exp = Experiment.load(finished / "experiment.yaml")
    setattr(exp.cache, key, value)
    with pytest.raises(MlfdError) as e:
        exp.validate()
    assert str(e.value) == message


def test_codec_changes_are_stale_the_location_is_not(ws, tmp_path):
    from mlfd.stages.cache import teacher_group
    from mlfd.workspace import Workspace

    def group():
        return teacher_group(Workspace.open(ws), 2, "alpha", "train")

    assert group().status() == "ok" and group().fingerprint["codec"] == "zstd"
    edit_experiment(ws, "cache", codec="lz4")
    assert group().reason() == "stale: codec zstd → lz4"
    edit_experiment(ws, "cache", codec="zstd", clevel=9)
    assert group().reason() == "stale: clevel 1 → 9"  # 1: the default
    edit_experiment(ws, "cache", clevel=1, dtype="bfloat16")
    assert group().reason() == "stale: dtype float16 → bfloat16"
    edit_experiment(ws, "cache", dtype="float16", uri=str(tmp_path / "moved"))
    assert group().status() == "missing" and str(group().path).startswith(str(tmp_path))
    import shutil

    shutil.copytree(ws / "cache", tmp_path / "moved")
    assert group().status() == "ok"  # a moved cache is the same cache


def test_cli_cache_uri(ws, tmp_path, capsys, memfs):
    import zarr

    msg = bad(capsys, "cache", "--workdir", ws, "--cache-uri", "s3://bucket/x", *LOCAL)
    assert msg == ("error: --cache-uri s3://bucket/x: fsspec has no filesystem for 's3' "
                   "(pip install s3fs)")
    assert run(capsys, "cache", "--workdir", ws, "--cache-uri", "s3://b/x", *LOCAL)[0] == 2
    ref = zarr.open_group(str(ws / "cache/teachers-L2.zarr/beta/train"), mode="r")["beta"][...]
    code, _, err = run(capsys, "cache", "--workdir", ws, "--cache-uri", f"file://{tmp_path}/c",
                       "--levels", 2, *LOCAL)
    assert code == 0, err
    assert yaml.safe_load((ws / "experiment.yaml").read_text())["cache"]["uri"] == \
        f"file://{tmp_path}/c"
    got = zarr.open_group(str(tmp_path / "c/teachers-L2.zarr/beta/train"), mode="r")["beta"]
    np.testing.assert_array_equal(got[...], ref)
    # the same values, so nothing downstream is redone; plain runs now use that location
    code, out, err = run(capsys, "distill", "--workdir", ws, "--dataset", "alpha", "-n",
                         "--json", *LOCAL)
    assert code == 0, err
    assert json.loads(out)["steps"] == []
    _, url = memfs
    code, _, err = run(capsys, "cache", "--workdir", ws, "--cache-uri", url, "--levels", 2,
                       *LOCAL)
    assert code == 0, err
    g = zarr.open_group(f"{url}/teachers-L2.zarr/beta/train", mode="r")
    np.testing.assert_array_equal(g["beta"][...], ref)
    code, out, err = run(capsys, "eval", "--workdir", ws, "--json", *LOCAL)
    assert code == 0, err


def test_bfloat16_caches_end_to_end(ws, capsys):
    """bfloat16 teacher and target caches feed fuse, the targets, distill and eval; the
    cached values are torch's bfloat16 rounding of the float32 embeddings."""
    import zarr

    from mlfd.stages.cache import teacher_group
    from mlfd.stages.targets import target_group
    from mlfd.workspace import Workspace

    edit_experiment(ws, "cache", dtype="float32")
    code, _, err = run(capsys, "cache", "--workdir", ws, "--levels", 2, *LOCAL)
    assert code == 0, err
    f32 = zarr.open_group(str(ws / "cache/teachers-L2.zarr/alpha/train"), mode="r")["beta"][...]
    assert f32.dtype == np.float32
    edit_experiment(ws, "cache", dtype="bfloat16")
    code, out, err = run(capsys, "distill", "--workdir", ws, "--dataset", "alpha", "--json",
                         *LOCAL)
    assert code == 0, err
    w = Workspace.open(ws)
    g = teacher_group(w, 2, "alpha", "train")
    assert g.dtypes()["beta"] == "bfloat16"
    got = to_tensor(g.load(["beta"])["beta"], "bfloat16")
    assert torch.equal(got, torch.from_numpy(f32).to(torch.bfloat16))
    t = target_group(w, 2, "alpha")
    assert t.status() == "ok" and set(t.dtypes().values()) == {"bfloat16", "int64"}
    rows = json.loads(out)["rows"]
    assert any(r["model"] == "student" and r["top1"] is not None for r in rows), rows
