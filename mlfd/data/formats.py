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
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from mlfd.errors import DatasetNotFound

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
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetNotFound(f"dataset file not found: {path}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetNotFound(f"corrupt gzip file {path}: {exc}") from None
    return raw


def _unpickle(path: Path, encoding: str) -> object:
    data = _read_maybe_gzip(path)
    try:
        return pickle.loads(data, encoding=encoding)
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


def read_mnist_pickle(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``mnist.pkl.gz`` -> {"train", "val", "test"}: uint8 (N, 28, 28, 1), int64 labels."""
    path = Path(path)
    obj = _unpickle(path, "latin1")
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


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(path, "bytes")
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


def read_cifar_meta(path: Path, key: bytes) -> list[str]:
    obj = _unpickle(path, "bytes")
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetNotFound(f"malformed CIFAR meta {path}: missing {key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in obj[key]]


def read_cifar_batches(paths: Iterable[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    parts = [_cifar_batch(Path(p), label_key) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ----------------------------------------------------------------------------- Animal-MNIST


def read_animal_pickles(
    data_path: str | os.PathLike, label_path: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST's two gzip'd pickles -> uint8 (N, 28, 28, 1), int64 labels."""
    images = np.asarray(_unpickle(Path(data_path), "latin1"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetNotFound(
            f"malformed Animal-MNIST images {data_path}: expected uint8 (N, H, W), got "
            f"{images.dtype} {images.shape}"
        )
    labels = as_labels(_unpickle(Path(label_path), "latin1"), label_path)
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
            images = to_uint8_images(npz[f"x_{split}"], f"{path}:x_{split}")
            labels = as_labels(npz[f"y_{split}"], f"{path}:y_{split}")
            _check_pair(images, labels, path)
            splits[split] = (images, labels)
        classes = [str(c) for c in npz["classes"]] if "classes" in keys else None
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


def list_image_folder(folder: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """``folder/<class>/<image>`` -> (sorted class names, absolute file paths, labels)."""
    folder = Path(folder)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetNotFound(f"no class folders found in {folder} (expected {folder}/<class>/)")
    files, labels = [], []
    for index, name in enumerate(classes):
        for f in sorted((folder / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(f.resolve()))
                labels.append(index)
    if not files:
        raise DatasetNotFound(
            f"no images found in {folder} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, files, np.asarray(labels, np.int64)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


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
