"""Low-level readers for the on-disk dataset formats, plus dedupe and seeded splitting.

Every reader returns plain numpy arrays (images uint8 NHWC, labels int64) and raises
:class:`~mlfd.errors.DatasetNotFound` with the offending path when a file is missing or
malformed, so the registry can pass the message straight to the user.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import numpy as np

from mlfd.errors import DatasetNotFound, MlfdError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# IDX dtype byte -> numpy big-endian dtype (see the format description on LeCun's page).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ----------------------------------------------------------------------------- helpers


def _read_maybe_gzip(path: Path) -> bytes:
    """File bytes, transparently gunzipped when the file starts with the gzip magic."""
    return _gunzip(_read_raw(path), path)


def _read_raw(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetNotFound(f"dataset file not found: {path}") from None


def _gunzip(raw: bytes, path: Path) -> bytes:
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetNotFound(f"corrupt gzip file {path}: {exc}") from None
    return raw


# ----------------------------------------------------------------------------- pickles


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


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Digest of named arrays (name, dtype, shape, bytes): independent of any container."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def as_labels(labels: object, path: Path | str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DatasetNotFound(
            f"malformed labels in {path}: expected a 1-D integer array, got {arr.dtype} {arr.shape}"
        )
    if arr.size and arr.min() < 0:
        raise DatasetNotFound(f"malformed labels in {path}: negative class index")
    return arr.astype(np.int64)


def _check_pair(images: np.ndarray, labels: np.ndarray, path: Path | str) -> None:
    if len(images) != len(labels):
        raise DatasetNotFound(
            f"malformed dataset {path}: {len(images)} images but {len(labels)} labels"
        )


# ----------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip'd) into a native-endian numpy array."""
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetNotFound(f"bad IDX magic in {path}: {data[:4].hex() or 'empty file'}")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetNotFound(f"truncated IDX header in {path}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetNotFound(
            f"malformed IDX file {path}: header says {shape} ({expected} bytes) but "
            f"{len(data) - header} bytes follow"
        )
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write ``arr`` as IDX (gzip'd when the name ends in .gz); used by tests and tools."""
    codes = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    code = codes[np.dtype(arr.dtype).newbyteorder("=")]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(arr, _IDX_DTYPES[code]).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """``stem`` raw or gzip'd; mirrors differ on '-idx' vs '.idx' in the name."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetNotFound(
            f"malformed IDX images {images_path}: expected uint8 (N, H, W), got "
            f"{images.dtype} {images.shape}"
        )
    labels = as_labels(read_idx(labels_path), labels_path)
    _check_pair(images, labels, labels_path)
    return images[..., None], labels


# ----------------------------------------------------------------------------- MNIST pickle


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


# ----------------------------------------------------------------------------- CIFAR


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


# ----------------------------------------------------------------------------- Animal-MNIST


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


# ----------------------------------------------------------------------------- npz


def to_uint8_images(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 (N,H,W[,C]) as is; float in [0, 1] scaled by 255; anything else rejected."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DatasetNotFound(
            f"malformed images {where}: expected (N, H, W) or (N, H, W, C) with C 1 or 3, "
            f"got shape {x.shape}"
        )
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise DatasetNotFound(f"malformed images {where}: float pixels must lie in [0, 1]")
        return np.rint(x.astype(np.float64) * 255.0).astype(np.uint8)
    raise DatasetNotFound(
        f"malformed images {where}: dtype {x.dtype} (use uint8, or floats in [0, 1])"
    )


def read_npz_splits(path: str | os.PathLike) -> tuple[dict, list[str] | None]:
    """``x_<split>, y_<split>`` for train/test (required) and val (optional).

    Returns ({split: (images, labels)}, classes or None when the file has no ``classes``).
    """
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetNotFound(f"dataset file not found: {path}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetNotFound(f"cannot read npz {path}: {exc}") from None
    with npz:
        keys = set(npz.files)

        def array(key: str) -> np.ndarray:
            # Members are read here, not by np.load: an object array (pickled Python
            # objects, refused by allow_pickle=False) or a damaged member fails now.
            try:
                return npz[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise DatasetNotFound(
                        f"cannot read npz {path}: {key} is an object array (pickled Python "
                        "objects are refused); save plain numeric or string arrays"
                    ) from None
                raise DatasetNotFound(f"cannot read npz {path}: {key}: {exc}") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DatasetNotFound(f"cannot read npz {path}: {key}: {exc}") from None

        missing = sorted({"x_train", "y_train", "x_test", "y_test"} - keys)
        if missing:
            raise DatasetNotFound(
                f"malformed npz {path}: missing keys {', '.join(missing)} "
                "(need x_train, y_train, x_test, y_test)"
            )
        splits = {}
        for split in ("train", "val", "test"):
            if f"x_{split}" not in keys or f"y_{split}" not in keys:
                continue
            images = to_uint8_images(array(f"x_{split}"), f"{path}:x_{split}")
            labels = as_labels(array(f"y_{split}"), f"{path}:y_{split}")
            _check_pair(images, labels, path)
            splits[split] = (images, labels)
        classes = [str(c) for c in array("classes")] if "classes" in keys else None
    return splits, classes


def write_npz_deterministic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Like np.savez_compressed but byte-reproducible: fixed zip timestamps and order."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for key in arrays:
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=6)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- ImageFolder


def class_folders(folder: str | os.PathLike) -> list[str]:
    """Sorted class folder names of ``folder``: hidden folders and macOS archive leftovers
    (``__MACOSX``) are not classes."""
    return sorted(
        d.name for d in Path(folder).iterdir() if d.is_dir() and not _hidden_name(d.name)
    )


def _hidden_name(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The dataset's images under ``folder`` (recursively), sorted: files with an image
    extension, skipping hidden files and folders (``.DS_Store``, macOS resource forks
    ``._name.png``, ``.ipynb_checkpoints/``), which no pipeline could decode."""
    folder = Path(folder)
    found = []
    for f in folder.rglob("*"):
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() and not any(
            _hidden_name(part) for part in f.relative_to(folder).parts
        ):
            found.append(f)
    return sorted(found)


def list_image_folder(
    folder: str | os.PathLike, drop_empty: bool | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    """``folder/<class>/<image>`` -> (sorted class names, absolute file paths, labels).

    A class folder without images is refused (it would count as a class that no image
    has); ``drop_empty`` (default: the ``--drop-empty-classes`` policy) leaves it out."""
    folder = Path(folder)
    names = class_folders(folder)
    if not names:
        raise DatasetNotFound(f"no class folders found in {folder} (expected {folder}/<class>/)")
    found = {name: image_files(folder / name) for name in names}
    if not any(found.values()):
        raise DatasetNotFound(
            f"no images found in {folder} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    empty = [name for name in names if not found[name]]
    drop = drop_empty_classes() if drop_empty is None else drop_empty
    if empty and not drop:
        more = f" (and {len(empty) - 1} more: {', '.join(empty[1:4])}" \
               f"{', ...' if len(empty) > 4 else ''})" if len(empty) > 1 else ""
        raise DatasetNotFound(
            f"class folder {folder / empty[0]} has no images{more}; remove it, or "
            "--drop-empty-classes leaves such classes out"
        )
    classes = [name for name in names if found[name]]
    files, labels = [], []
    for index, name in enumerate(classes):
        files += [str(f.resolve()) for f in found[name]]
        labels += [index] * len(found[name])
    return classes, files, np.asarray(labels, np.int64)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not _hidden_name(
        path.name
    )


# ----------------------------------------------------------------------------- image files

# PIL's own default (Image.MAX_IMAGE_PIXELS, about 89.5 Mpx): a PNG of a few hundred KiB
# can declare 20000x20000 pixels and ask for gigabytes once decoded. Images above the limit
# are refused from their header, before any decoding.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Set per command by the CLI (--max-image-pixels, --drop-empty-classes); read where image
# folders are listed and images decoded.
_POLICY = {"max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS, "drop_empty_classes": False}


def set_image_policy(max_image_pixels: int | None = None, drop_empty_classes: bool = False) -> None:
    if max_image_pixels is not None and max_image_pixels < 1:
        raise MlfdError(f"--max-image-pixels must be >= 1, got {max_image_pixels}")
    _POLICY["max_image_pixels"] = max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
    _POLICY["drop_empty_classes"] = bool(drop_empty_classes)


def max_image_pixels() -> int:
    return _POLICY["max_image_pixels"]


def drop_empty_classes() -> bool:
    return _POLICY["drop_empty_classes"]


class BadImage(MlfdError):
    """An image file of a dataset that cannot be used; ``reason`` is one short phrase
    (empty file, truncated, not an image, ...)."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        # one argument: the whole message (how a DataLoader worker's error is rebuilt)
        super().__init__(f"bad image {path}: {reason}" if reason is not None else str(path))
        self.path, self.reason = str(path), reason


# 16-bit samples are brought to 8 bits as round(v / 257), which is what DALI's decoder does.
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
GRAY_MODES = frozenset({"1", "L", *_SIXTEEN_BIT})  # decoded to one channel
# Modes both pipelines decode alike (checked against DALI's CPU decoder); others, such as
# 32-bit integer or float pixels, have no agreed 8-bit reading.
_MODES = GRAY_MODES | {"LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}


def _over_limit(pixels: int, limit: int, dims: str = "") -> str:
    return f"over the pixel limit: {dims}{pixels:,} pixels > {limit:,} (see --max-image-pixels)"


def check_pixels(path: str | os.PathLike, width: int, height: int, limit: int | None = None):
    """Refuse an image whose header declares more than ``limit`` pixels."""
    limit = limit or max_image_pixels()
    if width * height > limit:
        raise BadImage(path, _over_limit(width * height, limit, f"{width}x{height} = "))


_PIL_QUIET: list[bool] = []


def _pil(limit: int):
    """PIL, with its own decompression-bomb check kept out of the way of ours: it only ever
    fires above our limit (raised to at least ours), where we refuse anyway, and its
    warning would be a second line beside our one error line."""
    import warnings

    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    if not _PIL_QUIET:  # once per process (DataLoader workers included)
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _PIL_QUIET.append(True)
    return Image


def _decode_failure(path, exc: BaseException) -> BadImage:
    text = str(exc) or exc.__class__.__name__
    if "truncat" in text.lower():
        return BadImage(path, "truncated")
    return BadImage(path, f"undecodable ({exc.__class__.__name__}: {text})")


class open_image:  # noqa: N801 - used as a context manager, like open()
    """``with open_image(path) as im``: the PIL image with only its header read, refused
    (:class:`BadImage`) when empty, not an image, over the pixel limit or of a mode the
    pipelines do not read alike."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        self.path, self.limit = path, limit or max_image_pixels()

    def __enter__(self):
        Image = _pil(self.limit)  # noqa: N806
        from PIL import UnidentifiedImageError

        path = self.path
        try:
            if isinstance(path, (str, os.PathLike)) and os.stat(path).st_size == 0:
                raise BadImage(path, "empty file")
            self.im = Image.open(path)
        except BadImage:
            raise
        except Image.DecompressionBombError as exc:  # PIL's check: twice its limit, >= ours
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise BadImage(path, _over_limit(int(found.group(1)), self.limit) if found
                           else f"over the pixel limit: {exc}") from None
        except UnidentifiedImageError:
            raise BadImage(path, "not an image") from None
        except FileNotFoundError:
            raise BadImage(path, "file not found") from None
        except OSError as exc:
            raise _decode_failure(path, exc) from None
        except Exception as exc:  # a malformed header can fail in many ways
            raise _decode_failure(path, exc) from None
        try:
            check_pixels(path, self.im.width, self.im.height, self.limit)
            if self.im.mode not in _MODES:
                raise BadImage(path, f"wrong mode ({self.im.mode} pixels)")
        except BaseException:
            self.im.close()
            raise
        return self.im

    def __exit__(self, *exc) -> None:
        self.im.close()


def image_header(path: str | os.PathLike, limit: int | None = None) -> tuple[int, tuple]:
    """(channels, (height, width)) from the header: 1 channel for grayscale, else 3."""
    with open_image(path, limit) as im:
        return (1 if im.mode in GRAY_MODES else 3), (im.height, im.width)


def read_image(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Decode one file to uint8 (H, W, C), C 1 for grayscale and 3 otherwise (alpha
    dropped), as DALI's decoder reads it; any failure is a :class:`BadImage` naming it."""
    with open_image(path, limit) as im:
        try:
            arr = _pixels(im, path)
        except BadImage:
            raise
        except Exception as exc:  # decoding an untrusted file can fail in many ways
            raise _decode_failure(path, exc) from None
        if arr.shape[:2] != (im.height, im.width):
            raise BadImage(path, f"unexpected size (decoded {arr.shape[1]}x{arr.shape[0]}, "
                                 f"header {im.width}x{im.height})")
    return arr


def _to_8bit(wide: np.ndarray) -> np.ndarray:
    return ((wide.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257), no ties


def _pixels(im, path) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT:  # PIL's convert("L") would clip these at 255
        return _to_8bit(np.asarray(im))[:, :, None]
    if im.mode in GRAY_MODES:
        return np.array(im.convert("L"))[:, :, None]  # writable: torch warns on read-only
    wide = _png16_colour(im, path)
    if wide is not None:
        return _to_8bit(wide[:, :, :3])
    return np.array(im.convert("RGB"))


def _png16_colour(im, path) -> np.ndarray | None:
    """The 16-bit samples of a 16-bit colour PNG, or None. PIL keeps only each sample's
    high byte (v >> 8, up to one level below DALI's round(v / 257)); decoding the file a
    second time with the little-endian raw mode of the same layout yields the low bytes."""
    tile = im.tile
    raw = tile[0][3] if im.format == "PNG" and len(tile) == 1 else None
    if not isinstance(raw, str) or not raw.endswith(";16B"):
        return None
    high = np.asarray(im)
    Image = _pil(max_image_pixels())  # noqa: N806
    with Image.open(path) as again:
        first = again.tile[0]
        low_mode = raw[:-1] + "L"
        again.tile = [first._replace(args=low_mode) if hasattr(first, "_replace")
                      else (*first[:3], low_mode)]
        try:
            again.load()
        except ValueError:  # no such raw mode (16-bit gray + alpha): the high bytes it is
            return None
        low = np.asarray(again)
    return (high.astype(np.uint16) << 8) | low


def _read_text_lines(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetNotFound(f"dataset file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetNotFound(f"cannot read {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- Tiny ImageNet


def read_wnids(path: str | os.PathLike) -> list[str]:
    """``wnids.txt`` (one WordNet id a line) -> the sorted ids, which fix the label order."""
    wnids = sorted(set(_read_text_lines(Path(path))))
    if not wnids:
        raise DatasetNotFound(f"malformed {path}: no WordNet ids")
    return wnids


def read_words(path: str | os.PathLike) -> dict[str, str]:
    """``words.txt`` (``wnid<TAB>names``) -> {wnid: names}; an absent file gives {}."""
    path = Path(path)
    if not path.is_file():
        return {}
    words = {}
    for line in _read_text_lines(path):
        wnid, _, names = line.partition("\t")
        if names.strip():
            words[wnid.strip()] = names.strip()
    return words


def list_tinyimagenet_train(
    train_dir: str | os.PathLike, wnids: list[str]
) -> tuple[list[str], np.ndarray]:
    """``train/<wnid>/images/*`` for each wnid (label = its index) -> (files, labels)."""
    train_dir = Path(train_dir)
    files, labels = [], []
    for index, wnid in enumerate(wnids):
        folder = train_dir / wnid / "images"
        found = sorted(f for f in folder.glob("*") if _is_image(f)) if folder.is_dir() else []
        if not found:
            raise DatasetNotFound(f"no training images for class {wnid}: looked in {folder}")
        files.extend(str(f.resolve()) for f in found)
        labels.extend([index] * len(found))
    return files, np.asarray(labels, np.int64)


def read_tinyimagenet_val(
    val_dir: str | os.PathLike, wnids: list[str]
) -> tuple[list[str], np.ndarray]:
    """``val/images/*`` labelled by ``val/val_annotations.txt`` (file, wnid, bbox...).

    Sorted by file name so the split does not depend on the annotation file's row order.
    """
    val_dir = Path(val_dir)
    annotations = val_dir / "val_annotations.txt"
    index = {w: i for i, w in enumerate(wnids)}
    images = val_dir / "images"
    # One listing instead of a stat per row (10,000 rows in the real set).
    present = {f.name for f in images.glob("*")} if images.is_dir() else set()
    rows = {}
    for number, line in enumerate(_read_text_lines(annotations), 1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetNotFound(f"malformed {annotations} line {number}: expected file<TAB>wnid")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DatasetNotFound(
                f"malformed {annotations} line {number}: {wnid!r} is not in wnids.txt"
            )
        if name not in present:
            raise DatasetNotFound(f"validation image missing: {images / name}")
        rows[name] = index[wnid]
    if not rows:
        raise DatasetNotFound(f"malformed {annotations}: no annotations")
    names = sorted(rows)
    files = [str((images / n).resolve()) for n in names]
    return files, np.asarray([rows[n] for n in names], np.int64)


# ----------------------------------------------------------------------------- CSV lists

CSV_SPLITS = ("train", "val", "test")


def read_csv_list(
    path: str | os.PathLike, need_split: bool
) -> list[tuple[int, str, str, str | None]]:
    """A ``path,label[,split]`` CSV -> [(line, absolute file, label text, split or None)].

    Relative paths resolve against the CSV's folder; every file must exist (the first missing
    one is named). Extra columns are ignored; column names are matched case-insensitively.
    """
    path = Path(path).resolve()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a BOM
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise DatasetNotFound(f"dataset file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetNotFound(f"cannot read CSV {path}: {exc}") from None
    columns = [c.strip().lower() for c in header or []]
    wanted = ["path", "label"] + (["split"] if need_split else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        # Without a split column, the other accepted form is a folder of per-split lists.
        other = "; or give a folder with train.csv and test.csv" if need_split else ""
        raise DatasetNotFound(
            f"malformed CSV {path}: header lacks column(s) {', '.join(missing)} "
            f"(expected a header with {','.join(wanted)}; found {','.join(columns) or 'nothing'}"
            f"{other})"
        )
    at = {c: columns.index(c) for c in wanted}
    out = []
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(at.values()):
            raise DatasetNotFound(f"malformed CSV {path} line {line}: too few fields")
        file, label = row[at["path"]].strip(), row[at["label"]].strip()
        if not file or not label:
            raise DatasetNotFound(f"malformed CSV {path} line {line}: empty path or label")
        split = None
        if need_split:
            split = row[at["split"]].strip().lower()
            if split not in CSV_SPLITS:
                raise DatasetNotFound(
                    f"malformed CSV {path} line {line}: unknown split {row[at['split']]!r} "
                    f"(expected {', '.join(CSV_SPLITS)})"
                )
        full = Path(file).expanduser()
        full = full if full.is_absolute() else path.parent / full
        if not full.is_file():
            raise DatasetNotFound(f"image listed in {path} line {line} not found: {full}")
        out.append((line, str(full.resolve()), label, split))
    return out


def csv_labels(label_texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Label texts -> (class names, indices): all-integer labels are used as indices,
    anything else is a class name, numbered in sorted order."""
    if label_texts and all(re.fullmatch(r"[+-]?[0-9]+", t) for t in label_texts):
        values = np.asarray([int(t) for t in label_texts], np.int64)
        if values.min() < 0:
            raise DatasetNotFound(f"negative class index {int(values.min())} in the labels")
        return [str(i) for i in range(int(values.max()) + 1)], values
    classes = sorted(set(label_texts))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.asarray([index[t] for t in label_texts], np.int64)


# ----------------------------------------------------------------------------- dedupe + split


def dedupe(images: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the first occurrence of every distinct image."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    return np.sort(first)


def seeded_order(indices: np.ndarray, seed: int, salt: str) -> np.ndarray:
    """``indices`` in a pseudo-random order fixed by (seed, salt).

    Keys are hashes rather than numpy's RNG streams, so the order (and hence the shipped
    demo subsets) cannot change with the numpy version.
    """
    keys = [
        int.from_bytes(
            hashlib.blake2b(f"{salt}:{seed}:{i}".encode(), digest_size=8).digest(), "big"
        )
        for i in indices.tolist()
    ]
    return np.asarray(indices)[np.argsort(np.asarray(keys, np.uint64), kind="stable")]


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes proportionally to ``counts`` (largest remainder)."""
    exact = counts * (total / counts.sum())
    alloc = np.floor(exact).astype(np.int64)
    remainder = exact - alloc
    # Ties broken by class index so the result is deterministic.
    for k in np.argsort(-remainder, kind="stable")[: total - alloc.sum()]:
        alloc[k] += 1
    return np.minimum(alloc, counts)


def stratified_sample(labels: np.ndarray, n: int, seed: int, salt: str = "sample") -> np.ndarray:
    """``n`` positions into ``labels`` with class proportions kept, in seeded order."""
    labels = np.asarray(labels)
    if n > len(labels):
        raise ValueError(f"cannot sample {n} from {len(labels)} items")
    classes, counts = np.unique(labels, return_counts=True)
    chosen = []
    for cls, take in zip(classes, _allocate(counts, n), strict=True):
        members = np.flatnonzero(labels == cls)
        chosen.append(seeded_order(members, seed, f"{salt}/class{cls}")[:take])
    return seeded_order(np.concatenate(chosen), seed, f"{salt}/mix")


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int, salt: str = "split"
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, test) positions into ``labels``, each class split by the fraction."""
    labels = np.asarray(labels)
    n_test = int(round(len(labels) * test_fraction))
    test = stratified_sample(labels, n_test, seed, salt)
    rest = np.setdiff1d(np.arange(len(labels)), test)
    return seeded_order(rest, seed, f"{salt}/train"), test


def dedupe_and_split(
    images: np.ndarray, labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Drop exact duplicate images, then a seeded stratified split: no test image is in train.

    Shared by the ``animal-mnist`` loader and the demo-subset builder.
    """
    keep = dedupe(images)
    train, test = stratified_split(labels[keep], test_fraction, seed)
    return {
        "train": (images[keep[train]], labels[keep[train]]),
        "test": (images[keep[test]], labels[keep[test]]),
    }
