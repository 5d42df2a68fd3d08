"""Array formats: raw and gzip'd bytes, content digests, labels, IDX and npz files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mlfd.errors import DatasetNotFound

# IDX dtype byte -> numpy big-endian dtype (see the format description on LeCun's page).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


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
