"""Zarr cache: round trip, codecs, fingerprint refusal, staging, resume, damage detection."""

import json
import os

import numpy as np
import pytest
import torch

from mlfd.cache import MANIFEST, PROGRESS, CacheGroup, digest, integrity, layout
from mlfd.errors import CorruptArtifact, MlfdError, StaleCacheError

REBUILD = "re-run `mlfd cache`"


def _write(path, fp, feats, labels, rows_per_append=7):
    g = CacheGroup(path, fp)
    w = g.begin({"feat": (feats.shape, "float16"), "labels": (labels.shape, "int64")})
    w.append("labels", labels)
    for s in range(0, len(feats), rows_per_append):
        w.append("feat", feats[s:s + rows_per_append])
    w.close()
    return g


@pytest.fixture
def small_chunks(monkeypatch):
    """64-byte chunks, two per shard: a few rows each, so small arrays span many shards."""
    monkeypatch.setattr(layout, "CHUNK_BYTES", 64)
    monkeypatch.setattr(layout, "SHARD_BYTES", 128)


def _data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((n, 3)).astype(np.float32),  # 5 rows/chunk, 10/shard
            "b": rng.standard_normal((n, 2, 2)).astype(np.float16),  # (N, V, 2): chunks of
            # 16 rows of one view, shards of 16 rows of both
            "labels": rng.integers(0, 10, n)}  # 8 rows per chunk, 16 per shard


def _spec(d):
    return {"a": (d["a"].shape, "float32"), "b": (d["b"].shape, "float16"),
            "labels": (d["labels"].shape, "int64")}


def _feed(w, d, start, stop=None, batch=3):
    """Like a stage: labels whole, then `a` and `b` together batch by batch from `start`."""
    w.append("labels", d["labels"], start=0)
    stop = stop or len(d["a"])
    for s in range(start, stop, batch):
        e = min(s + batch, stop)
        w.append("a", torch.from_numpy(d["a"][s:e]), start=s)
        w.append("b", d["b"][s:e], start=s)


def test_round_trip_fp16_blosc_and_crc32c(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1000, 2, 8, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 1000)
    g = _write(tmp_path / "c.zarr" / "d" / "train", {"a": 1}, feats, labels)
    assert g.status() == "ok" and g.reason() == "ok"
    out = g.load()
    assert out["feat"].dtype == np.float16 and out["feat"].shape == feats.shape
    np.testing.assert_array_equal(out["feat"], feats.astype(np.float16))
    np.testing.assert_array_equal(out["labels"], labels)
    assert list(g.load(["labels"])) == ["labels"]
    import zarr

    arr = zarr.open_group(str(g.path), mode="r")["feat"]
    # ~1 MiB inner chunks along the sample axis holding one view each, in one shard of
    # all views (the array is < 64 MiB); inside the shard Blosc/Zstd with byte shuffle,
    # then a crc32c per chunk.
    view_row = 8 * 3 * 3 * 2
    assert arr.chunks == (min(1000, (1 << 20) // view_row), 1, 8, 3, 3)
    assert arr.shards == (arr.chunks[0] * -(-1000 // arr.chunks[0]), *feats.shape[1:])
    assert [c.to_dict()["name"] for c in arr.metadata.codecs] == ["sharding_indexed"]
    inner = arr.metadata.codecs[0].to_dict()["configuration"]
    names = [c["name"] for c in inner["codecs"]]
    assert names == ["bytes", "blosc", "crc32c"]
    assert [c["name"] for c in inner["index_codecs"]] == ["bytes", "crc32c"]
    codec = inner["codecs"][1]
    assert codec["configuration"]["cname"] == "zstd"
    assert codec["configuration"]["shuffle"] == "shuffle"
    # Promoted: nothing staged is left beside it, nor resume state inside it.
    assert sorted(p.name for p in g.path.parent.iterdir()) == ["train"]
    assert not (g.path / PROGRESS).exists() and (g.path / MANIFEST).exists()


def test_view_axis_arrays_are_chunked_one_view_at_a_time():
    """(N, V, ...) arrays: ~1 MiB chunks of one view, ~64 MiB shards of all views whose
    rows are whole chunks; 1-D and 2-D arrays keep whole rows per chunk."""
    # the paper-like L2 target: 8 views of 512x7x7 fp16 (50176 B a view)
    chunks, shards = layout.layout((1305, 8, 512, 7, 7), 2)
    assert chunks == ((1 << 20) // 50176, 1, 512, 7, 7) == (20, 1, 512, 7, 7)
    assert shards == (20 * ((64 << 20) // (20 * 8 * 50176)), 8, 512, 7, 7) == (160, 8, 512, 7, 7)
    # logits: 100 fp16 a view, all 1305 rows fit one chunk and one shard
    assert layout.layout((1305, 8, 100), 2) == ((1305, 1, 100), (1305, 8, 100))
    assert layout.layout((1000, 8), 2) == ((1000, 8), (1000, 8))  # (N, features)
    assert layout.layout((1000,), 8) == ((1000,), (1000,))  # labels


def test_view_chunked_array_round_trip_across_shards(tmp_path, small_chunks):
    import zarr

    rng = np.random.default_rng(3)
    values = rng.standard_normal((50, 3, 4)).astype(np.float32)  # 16 B a view
    g = CacheGroup(tmp_path / "g", {"x": 1})
    w = g.begin({"v": (values.shape, "float32")})
    for s in range(0, 50, 7):
        w.append("v", values[s:s + 7])
    w.close()
    arr = zarr.open_group(str(g.path), mode="r")["v"]
    # 4 rows of one view a chunk (64 B); a shard holds whole chunks of every view: 4 rows
    assert (arr.chunks, arr.shards) == ((4, 1, 4), (4, 3, 4))
    np.testing.assert_array_equal(g.load()["v"], values)
    for lo, hi, v in ((0, 50, 2), (3, 17, 0), (44, 50, 1)):
        np.testing.assert_array_equal(arr[lo:hi, v], values[lo:hi, v])


def test_stale_or_foreign_cache_is_refused_with_the_difference(tmp_path):
    path = tmp_path / "c.zarr" / "d" / "train"
    fp = {"checkpoint": "a" * 64, "views": 4, "dataset": "mnist"}
    _write(path, fp, np.zeros((10, 3), np.float32), np.zeros(10, np.int64))
    assert CacheGroup(path, fp).status() == "ok"
    g = CacheGroup(path, dict(fp, views=8, dtype="float32"))
    assert g.status() == "stale"
    assert g.reason() == "stale: dtype <absent> → float32; views 4 → 8"
    with pytest.raises(StaleCacheError, match=r"views 4 → 8") as e:
        g.load()
    assert str(path) in str(e.value) and REBUILD in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StaleCacheError, match=r"checkpoint a{12}… → b{12}…"):
        CacheGroup(path, dict(fp, checkpoint="b" * 64)).check()


def test_interrupted_write_leaves_no_group(tmp_path):
    path = tmp_path / "c.zarr" / "d" / "train"
    g = CacheGroup(path, {"x": 1})
    w = g.begin({"feat": ((10, 3), "float16")})
    w.append("feat", np.ones((4, 3)))
    assert g.status() == "missing" and g.reason() == "missing"
    with pytest.raises(MlfdError, match="missing") as e:
        g.load()
    assert str(path) in str(e.value) and REBUILD in str(e.value)
    with pytest.raises(MlfdError, match="wrote 4 of 10"):
        w.close()
    assert g.status() == "missing"
    assert CacheGroup(tmp_path / "nothing", {}).status() == "missing"


def test_groups_of_the_old_layout_are_rebuilt(tmp_path):
    import zarr

    path = tmp_path / "g"
    fp = {"x": 1}
    z = zarr.open_group(store=str(path), mode="w")
    z.create_array("feat", shape=(4,), chunks=(4,), dtype="float32", fill_value=0)[...] = 1
    z.attrs.update({"complete": False, "fingerprint": fp, "fingerprint_digest": digest(fp)})
    g = CacheGroup(path, fp)
    assert (g.status(), g.reason()) == ("incomplete", "incomplete (interrupted)")
    with pytest.raises(StaleCacheError, match="incomplete"):
        g.check()
    z.attrs["complete"] = True  # complete, but without manifest or chunk checksums
    assert (g.status(), g.reason()) == ("stale", "stale: cache format 1 → 3")
    z.attrs["format"] = 2  # unsharded: one file per chunk
    assert (g.status(), g.reason()) == ("stale", "stale: cache format 2 → 3")


def _chunk(g):
    return g.path / "a" / "c" / "3" / "0"  # rows 30..39: a shard in the middle


def _flip16(p):
    b = bytearray(p.read_bytes())
    mid = len(b) // 2 - 8
    b[mid:mid + 16] = bytes(x ^ 0xFF for x in b[mid:mid + 16])
    p.write_bytes(bytes(b))


def _smash_header(p):
    p.write_bytes(bytes(range(200, 216)) + p.read_bytes()[16:])


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _half_json(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {  # kind -> (file to damage, how, reason)
    "16 flipped bytes": ("a/c/3/0", _flip16, "corrupt: a/c/3/0 checksum mismatch"),
    "smashed blosc header": ("a/c/3/0", _smash_header, "corrupt: a/c/3/0 checksum mismatch"),
    "truncated chunk": ("a/c/3/0", _truncate, "corrupt: a/c/3/0 size mismatch"),
    "half group zarr.json": ("zarr.json", _half_json, "corrupt: zarr.json unreadable"),
    "half array zarr.json": ("b/zarr.json", _half_json, "corrupt: b/zarr.json size mismatch"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_files_are_corrupt_not_wrong_values(tmp_path, small_chunks, kind):
    d = _data()
    g = CacheGroup(tmp_path / "g", {"x": 1})
    w = g.begin(_spec(d))
    _feed(w, d, 0)
    w.close()
    assert g.status() == "ok"
    rel, damage, reason = DAMAGE[kind]
    damage(g.path / rel)
    assert g.status() == "corrupt"
    assert g.reason().startswith(reason)
    with pytest.raises(CorruptArtifact) as e:
        g.load()
    msg = str(e.value)
    assert str(g.path) in msg and rel in msg and REBUILD in msg and "\n" not in msg
    assert e.value.exit_code == 2


@pytest.mark.parametrize("damage", [_flip16, _smash_header, _truncate])
def test_chunk_checksum_catches_what_the_manifest_misses(tmp_path, small_chunks, damage):
    """Damage the manifest cannot see (it was rewritten to match): zarr's crc32c refuses
    the chunk and load() names the path in one line instead of a raw zarr error."""
    d = _data()
    g = CacheGroup(tmp_path / "g", {"x": 1})
    w = g.begin(_spec(d))
    _feed(w, d, 0)
    w.close()
    damage(_chunk(g))
    (g.path / MANIFEST).write_text(json.dumps({"files": integrity._manifest(g.path)}))
    assert g.status() == "ok"
    with pytest.raises(CorruptArtifact, match="array a failed to decode") as e:
        g.load()
    assert str(g.path) in str(e.value) and "\n" not in str(e.value)
    np.testing.assert_array_equal(g.load(["b"])["b"], d["b"])  # undamaged arrays still load


def test_killed_extraction_resumes_from_whole_shards(tmp_path, small_chunks):
    d = _data()
    fp = {"x": 1}
    one_shot = CacheGroup(tmp_path / "one", fp)
    w = one_shot.begin(_spec(d))
    _feed(w, d, 0)
    w.close()

    g = CacheGroup(tmp_path / "g", fp)
    w = g.begin(_spec(d))
    assert {k: w.cursor(k) for k in d} == {"a": 0, "b": 0, "labels": 0}
    _feed(w, d, 0, stop=22)
    del w  # killed: never closed
    assert g.status() == "missing"
    first_chunk = g.staging / "a" / "c" / "0" / "0"
    inode = first_chunk.stat().st_ino
    torn = g.staging / "a" / "c" / "4" / "0"  # past the cursor: a write the kill cut short
    torn.parent.mkdir()
    torn.write_bytes(b"torn by the kill")

    w = g.begin(_spec(d))
    # Durable rows stop at the last whole shard: a 10 rows/shard, b 16, labels all in.
    assert {k: w.cursor(k) for k in d} == {"a": 20, "b": 16, "labels": 50}
    start = min(w.cursor("a"), w.cursor("b"))
    _feed(w, d, start)
    w.close()
    out, ref = g.load(), one_shot.load()
    for k in d:
        np.testing.assert_array_equal(out[k], ref[k])
        np.testing.assert_array_equal(out[k], d[k])
    assert (g.path / "a" / "c" / "0" / "0").stat().st_ino == inode  # durable shard not rewritten
    assert g.status() == "ok" and not g.staging.exists()


def _stage_part(g, d):
    w = g.begin(_spec(d))
    _feed(w, d, 0, stop=30)
    assert w.cursor("a") == 30
    return w


@pytest.mark.parametrize("change", ["fingerprint", "restart", "shape"])
def test_other_inputs_or_restart_start_afresh(tmp_path, small_chunks, change):
    d = _data()
    _stage_part(CacheGroup(tmp_path / "g", {"x": 1}), d)
    g = CacheGroup(tmp_path / "g", {"x": 2} if change == "fingerprint" else {"x": 1})
    if change == "shape":
        d = _data(n=40)
    w = g.begin(_spec(d), restart=change == "restart")
    assert {k: w.cursor(k) for k in d} == {"a": 0, "b": 0, "labels": 0}
    _feed(w, d, 0)
    w.close()
    np.testing.assert_array_equal(g.load()["a"], d["a"])


def test_abandoned_forced_rewrite_keeps_the_finished_group(tmp_path, small_chunks):
    old = _data(seed=1)
    g = CacheGroup(tmp_path / "g", {"x": 1})
    w = g.begin(_spec(old))
    _feed(w, old, 0)
    w.close()
    for fp, restart in (({"x": 2}, False), ({"x": 1}, True)):  # new inputs; --force
        _stage_part(CacheGroup(tmp_path / "g", fp), _data(seed=2))
        if restart:
            CacheGroup(tmp_path / "g", fp).begin(_spec(old), restart=True).append("a", old["a"][:7])
        assert g.status() == "ok"
        np.testing.assert_array_equal(g.load()["a"], old["a"])


def test_promotion_killed_between_renames_is_recovered(tmp_path, small_chunks):
    d = _data()
    g = CacheGroup(tmp_path / "g", {"x": 1})
    w = g.begin(_spec(d))
    _feed(w, d, 0)
    w.close()
    old = tmp_path / ".g.old"
    os.replace(g.path, old)  # killed after moving the finished group aside
    assert g.status() == "ok" and not old.exists()
    np.testing.assert_array_equal(g.load()["b"], d["b"])
    os.replace(g.path, old)
    g.begin(_spec(d))  # begin() recovers too
    assert g.path.exists() and not old.exists() and g.status() == "ok"
    old.mkdir()  # killed after promoting, before deleting the previous group
    (old / "zarr.json").write_text("{}")
    assert g.status() == "ok" and not old.exists()


def test_append_checks_row_positions(tmp_path, small_chunks):
    g = CacheGroup(tmp_path / "g", {"x": 1})
    w = g.begin({"a": ((10, 3), "float32")})
    w.append("a", np.zeros((4, 3)))
    with pytest.raises(MlfdError, match="rows from 6 given, row 4 is missing"):
        w.append("a", np.zeros((2, 3)), start=6)
    with pytest.raises(MlfdError, match="rows up to 12 given, it has 10"):
        w.append("a", np.zeros((8, 3)))
    w.append("a", np.arange(30, dtype=np.float32).reshape(10, 3), start=0)  # first 4 dropped
    w.close()
    np.testing.assert_array_equal(g.load()["a"][4:], np.arange(12, 30).reshape(6, 3))
    assert not g.load()["a"][:4].any()
