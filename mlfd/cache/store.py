"""Zarr v3 store of teacher outputs, fingerprinted so stale or foreign caches are refused.

Layout: one group per (dataset, split) inside a stage's ``.zarr`` directory; arrays
have the sample index as the first axis and the view id as the second; ``labels``
beside them. The group's attributes hold the fingerprint (a dict of everything the
values depend on, plus its digest) and a ``complete`` flag set only after every
array was written, so an interrupted extraction is recognised and redone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MlfdError, StaleCacheError

CHUNK_BYTES = 1 << 20  # ~1 MiB chunks along the sample axis


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _zarr():
    import zarr  # imported lazily: CLI start-up stays fast

    return zarr


def _codec():
    from zarr.codecs import BloscCodec

    # Byte shuffle groups the high bytes of fp16/fp32 values: zstd then finds the redundancy.
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


def describe_difference(stored: dict, wanted: dict) -> str:
    diffs = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if a != b:
            short = lambda v: (v[:12] + "…") if isinstance(v, str) and len(v) > 16 else v  # noqa: E731
            diffs.append(f"{key}: cached {short(a)!s} vs now {short(b)!s}")
    return "; ".join(diffs) or "fingerprint digest differs"


@dataclass
class CacheGroup:
    """One (dataset, split) group: write arrays batch by batch, read them whole."""

    path: Path
    fingerprint: dict

    def exists(self) -> bool:
        return (self.path / "zarr.json").exists()

    def _group(self, mode="r"):
        return _zarr().open_group(store=str(self.path), mode=mode)

    def status(self) -> str:
        """'missing', 'incomplete', 'stale' or 'ok'."""
        if not self.exists():
            return "missing"
        attrs = dict(self._group().attrs)
        if not attrs.get("complete"):
            return "incomplete"
        if attrs.get("fingerprint_digest") != digest(self.fingerprint):
            return "stale"
        return "ok"

    def check(self) -> None:
        """Raise a clear error unless the cache is complete and matches the fingerprint."""
        st = self.status()
        if st == "missing":
            raise MlfdError(f"no cache at {self.path}: run `mlfd cache` first")
        if st == "incomplete":
            raise StaleCacheError(f"cache {self.path} is incomplete (interrupted): re-run `mlfd cache`")
        if st == "stale":
            stored = dict(self._group().attrs).get("fingerprint", {})
            raise StaleCacheError(
                f"cache {self.path} was made for other inputs ("
                f"{describe_difference(stored, self.fingerprint)}); re-run `mlfd cache --force`"
            )

    def begin(self, arrays: dict[str, tuple[tuple[int, ...], str]]) -> CacheWriter:
        """Start (re)writing the group: ``arrays`` maps name -> (shape, dtype)."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        g = self._group("w")
        g.attrs.update({"complete": False, "fingerprint": self.fingerprint,
                        "fingerprint_digest": digest(self.fingerprint)})
        handles = {}
        for name, (shape, dtype) in arrays.items():
            row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            rows = max(1, min(shape[0], CHUNK_BYTES // max(row, 1)))
            handles[name] = g.create_array(name, shape=shape, chunks=(rows, *shape[1:]),
                                           dtype=dtype, compressors=[_codec()], fill_value=0)
        return CacheWriter(self, g, handles)

    def load(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Whole arrays in memory: random batches from zarr chunks would be ~1000x slower."""
        self.check()
        g = self._group()
        names = names or [k for k in g.array_keys()]
        return {k: g[k][...] for k in names}

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class CacheWriter:
    def __init__(self, group: CacheGroup, zgroup, handles):
        self.group, self.zgroup, self.handles = group, zgroup, handles
        self._buffers: dict[str, list] = {k: [] for k in handles}
        self._cursor: dict[str, int] = {k: 0 for k in handles}
        self._buffered: dict[str, int] = {k: 0 for k in handles}

    def append(self, name: str, values) -> None:
        """Append rows along the sample axis; flushed to zarr in whole chunks."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        arr = self.handles[name]
        self._buffers[name].append(np.asarray(values, dtype=arr.dtype))
        self._buffered[name] += len(values)
        if self._buffered[name] >= arr.chunks[0]:
            self._flush(name)

    def _flush(self, name: str) -> None:
        if not self._buffers[name]:
            return
        block = np.concatenate(self._buffers[name])
        start = self._cursor[name]
        self.handles[name][start:start + len(block)] = block
        self._cursor[name] += len(block)
        self._buffers[name], self._buffered[name] = [], 0

    def close(self) -> None:
        for name, arr in self.handles.items():
            self._flush(name)
            if self._cursor[name] != arr.shape[0]:
                raise MlfdError(f"cache array {name}: wrote {self._cursor[name]} of {arr.shape[0]} rows")
        self.zgroup.attrs["complete"] = True
