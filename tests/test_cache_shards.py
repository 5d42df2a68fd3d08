"""mlfd.cache.shards: the direct shard reader and writer give bitwise what zarr-python
gives, in files any zarr client reads; damage is still caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from mlfd.cache import CacheGroup, layout, shards, stream, writer
from mlfd.cache.stream import TargetStream
from mlfd.data.sampling import chunk_order
from mlfd.errors import CorruptArtifact

N, V = 203, 3  # an edge chunk and a short last shard
_REAL_FOR_ARRAY = shards.for_array


def _values(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = np.maximum(rng.standard_normal((N, V, 6, 2, 2)), 0) * 3
    maps[:16] = 0  # whole chunks of exact zeros: zarr-python does not store them
    return {"L2": maps.astype(np.float32), "L1": rng.standard_normal((N, V, 10)),
            "logits": rng.standard_normal((N, V, 4)) * 5,
            "labels": rng.integers(0, 4, N).astype(np.int64)}


def _write(path, dtype: str, codec: str, direct: bool, monkeypatch) -> CacheGroup:
    if not direct:
        monkeypatch.setattr(writer, "for_array", lambda arr: None)
    g = CacheGroup(path, {"x": 1}, codec=codec, clevel=1)
    vals = _values()
    w = g.begin({k: (v.shape, "int64" if k == "labels" else dtype) for k, v in vals.items()})
    for s in range(0, N, 37):  # batches that straddle chunks and shards
        for k, v in vals.items():
            w.append(k, torch.from_numpy(v[s:s + 37]) if k != "labels" else v[s:s + 37])
    w.close()
    monkeypatch.setattr(writer, "for_array", _REAL_FOR_ARRAY)
    return g


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(layout, "CHUNK_BYTES", 200)  # a few rows per chunk
    monkeypatch.setattr(layout, "SHARD_BYTES", 200 * V * 4)  # a few chunks per shard


def _plain(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][...] for k in g.array_keys()}


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
def test_every_reader_and_writer_gives_the_same_bits(tmp_path, monkeypatch, small, codec,
                                                     dtype):
    direct = _write(tmp_path / "direct", dtype, codec, True, monkeypatch)
    python = _write(tmp_path / "python", dtype, codec, False, monkeypatch)
    # the direct writer's files: plain zarr-python reads them, and they hold what
    # zarr-python's own writer stored
    plain_direct, plain_python = _plain(direct.path), _plain(python.path)
    assert set(plain_direct) == set(plain_python)
    for k in plain_python:
        np.testing.assert_array_equal(_bits(plain_direct[k]), _bits(plain_python[k]))
    # several shard files per array: the direct path really wrote and read shards
    assert len([p for p in (direct.path / "L2" / "c").rglob("*") if p.is_file()]) > 2
    arr = zarr.open_group(str(direct.path), mode="r")["L2"]
    assert shards.for_array(arr) is not None
    # zarr-python left the all-zero chunks out (index entries 2**64-1, or no shard file
    # at all where the whole shard is zeros): the direct reader fills them, as zarr does
    skipped = shards.for_array(zarr.open_group(str(python.path), mode="r")["L2"]).index(0)
    assert skipped is None or (skipped[..., 0] == 2**64 - 1).any()
    # whole loads, direct (default) and through zarr-python
    for g in (direct, python):
        loaded = g.load()
        for k, v in plain_python.items():
            np.testing.assert_array_equal(_bits(loaded[k]), _bits(v))
    monkeypatch.setattr(shards, "for_array", lambda a: None)
    loaded = direct.load(rows=(17, 190))
    for k, v in plain_python.items():
        np.testing.assert_array_equal(_bits(loaded[k]), _bits(v[17:190]))
    monkeypatch.setattr(shards, "for_array", _REAL_FOR_ARRAY)
    # streamed, direct and through zarr-python: the same batches
    zg = direct.open_read()
    R = zg["L2"].chunks[0]
    order = chunk_order(N, 1, 0, V, R, 2)
    names = ["L2", "L1", "logits"]
    batches = {}
    for mode in ("direct", "python"):
        if mode == "python":
            monkeypatch.setattr(stream, "for_array", lambda a: None)
        got = list(TargetStream(zg, names, order, 16, chunk_rows=R, window=2))
        batches[mode] = {k: torch.cat([b[k] for b in got]) for k in names}
    for k in names:
        a, b = batches["direct"][k], batches["python"][k]
        assert a.dtype == b.dtype and torch.equal(a, b)


def _flip(path, frac: float = 0.3) -> None:
    b = bytearray(path.read_bytes())
    i = int(len(b) * frac)
    b[i] ^= 0x01  # one bit: a payload that may still decompress, but not to its crc32c
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_direct_reads_refuse_a_flipped_bit(tmp_path, monkeypatch, small, codec):
    g = _write(tmp_path / "g", "float16", codec, True, monkeypatch)
    files = sorted(p for p in (g.path / "L2" / "c").rglob("*") if p.is_file())
    _flip(files[1])
    arr = zarr.open_group(str(g.path), mode="r")["L2"]
    sa = shards.for_array(arr)
    rows = range(sa.shard_rows, 2 * sa.shard_rows)
    with pytest.raises(ValueError, match="checksum"):
        for v in range(V):  # the flipped chunk is in one of the views
            sa.read(rows.start, rows.stop, v)
    with pytest.raises(ValueError, match="checksum"):
        shards.read_rows(arr)
    # through the store, a one-line CorruptArtifact naming the array
    g._dir(g.path).delete("verified.json")
    monkeypatch.setattr(CacheGroup, "check", lambda self: None)  # past the manifest check
    with pytest.raises(CorruptArtifact, match="array L2 failed to decode"):
        g.load(["L2"])


def test_a_truncated_shard_is_an_error_not_zeros(tmp_path, monkeypatch, small):
    g = _write(tmp_path / "g", "float16", "zstd", True, monkeypatch)
    f = sorted(p for p in (g.path / "L1" / "c").rglob("*") if p.is_file())[0]
    f.write_bytes(f.read_bytes()[:-40])
    sa = shards.for_array(zarr.open_group(str(g.path), mode="r")["L1"])
    with pytest.raises(ValueError):
        sa.read(0, sa.shard_rows)


def test_other_layouts_and_stores_go_through_zarr_python(tmp_path):
    from zarr.codecs import BloscCodec, Crc32cCodec

    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    plain = zarr.create_array(str(tmp_path / "a"), shape=x.shape, chunks=(5, 3), dtype=x.dtype)
    assert shards.for_array(plain) is None  # not sharded
    bit = zarr.create_array(str(tmp_path / "b"), shape=x.shape, chunks=(5, 3), shards=(10, 3),
                            dtype=x.dtype, fill_value=0,
                            compressors=[BloscCodec(cname="zstd", shuffle="bitshuffle"),
                                         Crc32cCodec()])
    assert shards.for_array(bit) is None  # another shuffle
    mem = zarr.create_array(zarr.storage.MemoryStore(), shape=x.shape, chunks=(5, 3),
                            shards=(10, 3), dtype=x.dtype, fill_value=0,
                            compressors=layout._codecs("zstd", 1))
    mem[:] = x
    assert shards.for_array(mem) is None
    np.testing.assert_array_equal(shards.read_rows(mem, 3, 17), x[3:17])
