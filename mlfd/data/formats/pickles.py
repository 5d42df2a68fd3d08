"""Pickle-based formats (MNIST's mnist.pkl.gz, CIFAR batches, Animal-MNIST): checked
against their published checksums, then read with a restricted unpickler."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import numpy as np

from mlfd.errors import DatasetNotFound

from .arrays import _check_pair, _gunzip, _read_raw, as_labels


class ChecksumMismatch(DatasetNotFound):
    """A pickle-based dataset file that is not the published one."""


class UnsafePickle(DatasetNotFound):
    """A pickle that asks for more than numpy arrays and builtin containers."""


def _hex(algorithm: str, data: bytes) -> str:
    return hashlib.new(algorithm, data, usedforsecurity=False).hexdigest()


def _matches(data: bytes, known: Collection[str]) -> bool:
    """``known``: digests written "md5:<hex>" or "sha256:<hex>"."""
    algorithms = sorted({k.split(":", 1)[0] for k in known})
    return any(f"{a}:{_hex(a, data)}" in known for a in algorithms)


def _published(path: Path, raw: bytes, known: Collection[str]) -> bytes | None:
    """None when ``raw`` matches one of the ``known`` digests, its gunzipped content when
    that does (a re-compressed or gunzipped copy of a published pickle); else refused."""
    if _matches(raw, known):
        return None
    content = _gunzip(raw, path)
    if content is not raw and _matches(content, known):
        return content
    algorithm = sorted(k.split(":", 1)[0] for k in known)[0]
    raise ChecksumMismatch(
        f"{path} is not the published file ({algorithm} {_hex(algorithm, raw)} matches none "
        "of its known checksums): refusing to unpickle it; if it is your own re-encoded copy, "
        "--trust-data reads it anyway (still with the restricted unpickler)"
    )


def verify_published(path: str | os.PathLike, known: Collection[str]) -> None:
    """Refuse ``path`` unless it (or its gunzipped content) matches a ``known`` digest,
    written "md5:<hex>" or "sha256:<hex>"."""
    path = Path(path)
    _published(path, _read_raw(path), known)


def read_verified(path: str | os.PathLike, known: Collection[str] | None) -> bytes:
    """The bytes of ``path`` (gunzipped), once :func:`verify_published` accepts them.

    The digest is taken of the very bytes that are then unpickled, not of a separate read
    (the file could change in between), and every run: it costs ~35 ms for MNIST's 17 MB
    against >1 s of decoding it, and a memo would need a writable place to live.
    ``known=None`` skips the check: the user vouched for the file (``--trust-data``); it is
    still read with the restricted unpickler."""
    path = Path(path)
    raw = _read_raw(path)
    content = None if known is None else _published(path, raw, known)
    return _gunzip(raw, path) if content is None else content


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2; other codecs refused."""
    if encoding.replace("-", "").lower() != "latin1":
        raise ValueError(f"_codecs.encode with codec {encoding!r} is refused")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """What pickled numpy arrays, dtypes and scalars need, under every module name numpy
    has written them with (numpy 1 ``numpy.core``, numpy 2 ``numpy._core``)."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    for module in ("builtins", "__builtin__"):  # Python 2 pickles name it __builtin__
        for kind in (list, tuple, dict, set, frozenset):
            table[(module, kind.__name__)] = kind
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and builtin containers and nothing else: a
    dataset file from a data root is untrusted, and plain pickle runs whatever it names.

    ``find_class`` answers from a fixed table and imports nothing."""

    def __init__(self, file, path: Path, encoding: str):
        super().__init__(file, encoding=encoding)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"refusing to unpickle {self._path}: it asks for {module}.{name}, and a "
                "dataset file may hold only numpy arrays and builtin containers"
            ) from None


def _unpickle(path: Path, encoding: str, known: Collection[str] | None) -> object:
    data = read_verified(path, known)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path, encoding).load()
    except UnsafePickle:
        raise
    except Exception as exc:  # any unpickling failure means the file is not what we expect
        raise DatasetNotFound(f"cannot unpickle {path}: {exc}") from None


def mnist_float_to_uint8(x: np.ndarray, path: Path | str) -> np.ndarray:
    """The pickled MNIST stores byte/256 as float32 (max 255/256), so x*256 is exact."""
    x = np.asarray(x)
    out = np.empty(x.shape, np.uint8)
    scale = np.float32(256)
    for start in range(0, len(x), 8192):  # chunks stay in cache and keep temporaries small
        part = x[start : start + 8192]
        with np.errstate(invalid="ignore"):
            chunk = (part * scale).astype(np.uint8)
        # Lossless check (also catches negatives, values >= 1 and NaN, which wrap or break).
        if not np.array_equal(chunk.astype(np.float32) / scale, part):
            raise DatasetNotFound(f"malformed MNIST pickle {path}: pixels are not k/256 values")
        out[start : start + 8192] = chunk
    return out


def read_mnist_pickle(
    path: str | os.PathLike, known: Collection[str] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``mnist.pkl.gz`` -> {"train", "val", "test"}: uint8 (N, 28, 28, 1), int64 labels.

    ``known``: its published checksums (see :func:`read_verified`; None: not checked)."""
    path = Path(path)
    obj = _unpickle(path, "latin1", known)
    if not isinstance(obj, (tuple, list)) or len(obj) != 3:
        raise DatasetNotFound(f"malformed MNIST pickle {path}: expected 3 (X, y) tuples")
    out = {}
    for split, part in zip(("train", "val", "test"), obj, strict=True):
        if not isinstance(part, (tuple, list)) or len(part) != 2:
            raise DatasetNotFound(f"malformed MNIST pickle {path}: {split} is not (X, y)")
        x = np.asarray(part[0])
        if x.ndim != 2 or x.shape[1] != 784 or x.dtype != np.float32:
            raise DatasetNotFound(
                f"malformed MNIST pickle {path}: {split} X is {x.dtype} {x.shape}, "
                "expected float32 (n, 784)"
            )
        labels = as_labels(part[1], path)
        _check_pair(x, labels, path)
        out[split] = (mnist_float_to_uint8(x, path).reshape(-1, 28, 28, 1), labels)
    return out


def _cifar_batch(
    path: Path, label_key: bytes, known: Collection[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(path, "bytes", known)
    if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
        raise DatasetNotFound(
            f"malformed CIFAR batch {path}: expected keys b'data' and {label_key!r}"
        )
    data = np.asarray(obj[b"data"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DatasetNotFound(
            f"malformed CIFAR batch {path}: data is {data.dtype} {data.shape}, "
            "expected uint8 (N, 3072)"
        )
    labels = as_labels(obj[label_key], path)
    _check_pair(data, labels, path)
    # Rows are stored channel-major (1024 R, 1024 G, 1024 B); the project uses NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar_meta(path: Path, key: bytes, known: Collection[str] | None = None) -> list[str]:
    obj = _unpickle(path, "bytes", known)
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetNotFound(f"malformed CIFAR meta {path}: missing {key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in obj[key]]


def read_cifar_batches(
    paths: Iterable[Path], label_key: bytes, known: Mapping[str, Collection[str]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The batches in ``paths``, concatenated; ``known``: file name -> published checksums
    (None: not checked)."""
    paths = [Path(p) for p in paths]
    parts = [_cifar_batch(p, label_key, None if known is None else known[p.name]) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_animal_pickles(
    data_path: str | os.PathLike,
    label_path: str | os.PathLike,
    known: Mapping[str, Collection[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST's two gzip'd pickles -> uint8 (N, 28, 28, 1), int64 labels.

    ``known``: file name -> published checksums (None: not checked)."""
    data_path, label_path = Path(data_path), Path(label_path)

    def digests(path: Path) -> Collection[str] | None:
        return None if known is None else known[path.name]

    images = np.asarray(_unpickle(data_path, "latin1", digests(data_path)))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetNotFound(
            f"malformed Animal-MNIST images {data_path}: expected uint8 (N, H, W), got "
            f"{images.dtype} {images.shape}"
        )
    labels = as_labels(_unpickle(label_path, "latin1", digests(label_path)), label_path)
    _check_pair(images, labels, label_path)
    return images[..., None], labels
