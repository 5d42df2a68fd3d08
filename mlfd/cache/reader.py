"""Reading a cache group: its state (missing, incomplete, stale, corrupt or ok, and why),
and its arrays whole or by rows. ``CacheGroup`` is the one handle on a group: its writing
half (staging, resume, promotion) is ``writer.StagedWrites``; streaming reads of groups
too big for memory are ``stream``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from ..config import check_codec
from ..errors import CorruptArtifact, MlfdError, StaleCacheError
from ..storage.fingerprint import digest
from ..storage.uri import url_to_fs
from .integrity import (
    DECODE_ERRORS,
    _attrs,
    _damage_note,
    _verify,
    describe_difference,
    record_damage,
)
from .layout import FORMAT, MANIFEST, _LocalDir, _RemoteDir, _zarr, to_tensor
from .quant import QUANTISED, dequantised, scale_name
from .shards import read_rows
from .writer import StagedWrites

if TYPE_CHECKING:
    import torch


@dataclass
class CacheGroup(StagedWrites):
    """One (dataset, split) group: written batch by batch (resumably), read whole.

    ``path`` is a local path or an fsspec URL; for a URL it becomes the path on ``fs``."""

    path: Path
    fingerprint: dict
    codec: str = "zstd"
    clevel: int = 5
    fs: object = field(default=None, repr=False)

    def __post_init__(self):
        check_codec(self.codec, self.clevel)
        self._url = None
        if self.fs is None and isinstance(self.path, str) and "://" in self.path:
            self.fs, path = url_to_fs(self.path)
            if self.fs is not None:
                self._url = self.path.rstrip("/")  # messages name it as it was given
            self.path = Path(path) if self.fs is None else PurePosixPath(path)
        elif self.fs is None:
            self.path = Path(self.path)
        else:
            self.path = PurePosixPath(self.path)

    @property
    def location(self) -> str:
        """The group's path or URL, for messages."""
        if self.fs is None:
            return str(self.path)
        return self._url or self.fs.unstrip_protocol(str(self.path))

    @property
    def staging(self) -> Path:
        return self.path.parent / f".{self.path.name}.partial"

    def _dir(self, path):
        return _LocalDir(path) if self.fs is None else _RemoteDir(self.fs, str(path))

    @property
    def _storage(self) -> dict:
        return {"codec": self.codec, "clevel": self.clevel}

    def exists(self) -> bool:
        return self._dir(self.path).exists("zarr.json")

    def _inspect(self, reading: bool = False) -> tuple[str, str]:
        """(state, why). ``reading``: for a reader, which damaged.json does not stop: the
        chunks' crc32c refuse exactly the damaged ones, the rest of the group reads."""
        self._recover()
        if not self.exists():
            return "missing", "missing"
        final = self._dir(self.path)
        try:
            attrs = _attrs(final)
        except (OSError, ValueError, KeyError, TypeError):
            return "corrupt", "corrupt: zarr.json unreadable"
        if not attrs.get("complete"):
            return "incomplete", "incomplete (interrupted)"
        if attrs.get("format", 1) != FORMAT:
            return "stale", f"stale: cache format {attrs.get('format', 1)} → {FORMAT}"
        if attrs.get("fingerprint_digest") != digest(self.fingerprint):
            stored = attrs.get("fingerprint")
            return "stale", "stale: " + describe_difference(
                stored if isinstance(stored, dict) else {}, self.fingerprint)
        if self.fs is not None and not final.exists(MANIFEST) \
                and self._dir(self.staging).exists(MANIFEST):
            return "incomplete", "incomplete (being copied into place)"
        if not reading and (note := _damage_note(final)):
            return "corrupt", f"corrupt: {note}"
        problem = _verify(final)  # last: it reads every file changed since its last check
        return ("corrupt", f"corrupt: {problem}") if problem else ("ok", "ok")

    def status(self) -> str:
        """'missing', 'incomplete', 'stale', 'corrupt' or 'ok', of the complete group only."""
        return self._inspect()[0]

    def reason(self) -> str:
        """One line saying why: 'ok', 'missing', 'stale: views 4 → 8', 'corrupt: ...'."""
        return self._inspect()[1]

    def _rebuild_hint(self, why: str, recorded: bool = True) -> str:
        if not recorded:  # damage nothing on disk shows: only --force rewrites the group
            return (f"cache {self.location}: {why}; re-run `mlfd cache --force` to rebuild "
                    "it")
        verb = "build" if why == "missing" else "rebuild"
        return (f"cache {self.location}: {why}; re-run `mlfd cache` (or `mlfd distill`) to "
                f"{verb} it, no --force needed")

    def record_damage(self, array: str, why: str) -> bool:
        """``array`` failed to decode when read: see ``record_damage`` (module level)."""
        return record_damage(self._dir(self.path), array, why)

    def check(self) -> None:
        """Raise a one-line error unless the group is complete, current and intact (by its
        manifest: arrays recorded as damaged by a failed read make status() ask for a
        rebuild, but their undamaged chunks still read)."""
        state, why = self._inspect(reading=True)
        if state == "ok":
            return
        error = {"missing": MlfdError, "corrupt": CorruptArtifact}.get(state, StaleCacheError)
        raise error(self._rebuild_hint(why))

    def _stored_arrays(self) -> dict[str, list]:
        try:
            arrays = _attrs(self._dir(self.path))["arrays"]
            if isinstance(arrays, dict):
                return arrays
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.check()  # raises the one-line reason (missing, corrupt, ...)
        raise CorruptArtifact(self._rebuild_hint("corrupt: zarr.json has no array specs"))

    def dtypes(self) -> dict[str, str]:
        """The logical dtype of every array (a ``bfloat16`` array loads as uint16)."""
        return {k: v[1] for k, v in self._stored_arrays().items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every array (from the group's metadata: no integrity read)."""
        return {k: tuple(int(n) for n in v[0]) for k, v in self._stored_arrays().items()}

    def load(self, names: list[str] | None = None,
             rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Whole arrays in memory: random batches from zarr chunks would be ~1000x slower.
        bfloat16 arrays come as their uint16 bit patterns: see ``tensors`` / ``to_tensor``.
        With ``rows`` (start, stop): those rows of each array only."""
        self.check()
        stored = self._stored_arrays()
        names = list(names or stored)
        if unknown := [k for k in names if k not in stored]:
            raise MlfdError(f"cache {self.location} has no array {unknown[0]!r} "
                            f"(has {', '.join(stored)})")
        # an int8 array's scales come with it: ``tensors`` multiplies them back in
        names += [scale_name(k) for k in names if stored[k][1] == QUANTISED
                  and scale_name(k) in stored and scale_name(k) not in names]
        out = {}
        g = _zarr().open_group(store=self.zarr_store(), mode="r")
        for k in names:
            try:
                out[k] = read_rows(g[k], *(rows or (0, None)))
            except DECODE_ERRORS as e:  # damage check() did not see: still one clear line
                recorded = self.record_damage(k, type(e).__name__)  # so a re-run rebuilds
                raise CorruptArtifact(self._rebuild_hint(
                    f"corrupt: array {k} failed to decode ({type(e).__name__})", recorded)) from e
        return out

    def tensors(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Arrays from ``load()`` as tensors of their logical dtypes (memory shared); int8
        arrays dequantised to float32 with their scales (which are not returned)."""
        dtypes = self.dtypes()
        return dequantised({k: to_tensor(v, dtypes.get(k, v.dtype.name))
                            for k, v in arrays.items()}, dtypes)

    def zarr_store(self, read_only: bool = True):
        """The zarr store (or local path) of the complete group, unchecked: for readers that
        check it themselves or read metadata only."""
        return self._dir(self.path).zarr_store(read_only=read_only)

    def open_read(self):
        """The checked, complete group opened read-only (zarr arrays read lazily by slice)."""
        self.check()
        return _zarr().open_group(store=self.zarr_store(), mode="r")

    def nbytes(self) -> int:
        return self._dir(self.path).nbytes()
