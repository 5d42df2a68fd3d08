"""Zarr cache: round trip, fp16 storage, codec, fingerprint refusal, interrupted writes."""

import numpy as np
import pytest

from mlfd.cache import CacheGroup
from mlfd.errors import MlfdError, StaleCacheError


def _write(path, fp, feats, labels, rows_per_append=7):
    g = CacheGroup(path, fp)
    w = g.begin({"feat": (feats.shape, "float16"), "labels": (labels.shape, "int64")})
    w.append("labels", labels)
    for s in range(0, len(feats), rows_per_append):
        w.append("feat", feats[s:s + rows_per_append])
    w.close()
    return g


def test_round_trip_fp16_and_blosc(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1000, 2, 8, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 1000)
    g = _write(tmp_path / "c.zarr" / "d" / "train", {"a": 1}, feats, labels)
    out = g.load()
    assert out["feat"].dtype == np.float16 and out["feat"].shape == feats.shape
    np.testing.assert_array_equal(out["feat"], feats.astype(np.float16))
    np.testing.assert_array_equal(out["labels"], labels)
    import zarr

    arr = zarr.open_group(str(g.path), mode="r")["feat"]
    # ~1 MiB chunks along the sample axis; Blosc/Zstd with byte shuffle.
    row = 2 * 8 * 3 * 3 * 2
    assert arr.chunks[0] == min(1000, (1 << 20) // row) and arr.chunks[1:] == feats.shape[1:]
    codec = arr.metadata.codecs[-1].to_dict()
    assert codec["name"] == "blosc"
    assert codec["configuration"]["cname"] == "zstd"
    assert codec["configuration"]["shuffle"] == "shuffle"


def test_stale_or_foreign_cache_is_refused_with_the_difference(tmp_path):
    path = tmp_path / "c.zarr" / "d" / "train"
    fp = {"checkpoint": "a" * 64, "views": 4, "dataset": "mnist"}
    _write(path, fp, np.zeros((10, 3), np.float32), np.zeros(10, np.int64))
    assert CacheGroup(path, fp).status() == "ok"
    other = dict(fp, views=2)
    g = CacheGroup(path, other)
    assert g.status() == "stale"
    with pytest.raises(StaleCacheError, match=r"views: cached 4 vs now 2"):
        g.load()
    with pytest.raises(StaleCacheError, match=r"checkpoint: cached a{12}"):
        CacheGroup(path, dict(fp, checkpoint="b" * 64)).check()


def test_interrupted_write_is_not_complete(tmp_path):
    path = tmp_path / "c.zarr" / "d" / "train"
    g = CacheGroup(path, {"x": 1})
    w = g.begin({"feat": ((10, 3), "float16")})
    w.append("feat", np.ones((4, 3)))
    assert g.status() == "incomplete"
    with pytest.raises(StaleCacheError, match="incomplete"):
        g.load()
    with pytest.raises(MlfdError, match="wrote 4 of 10"):
        w.close()
    assert CacheGroup(tmp_path / "nothing", {}).status() == "missing"
