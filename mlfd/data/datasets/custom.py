"""Datasets a user brings: ImageFolder trees, .npz files, CSV lists and folders of them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlfd.data import formats
from mlfd.errors import DatasetNotFound

from .base import (
    IMAGENET_GRAY_MEAN,
    IMAGENET_GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Dataset,
    Split,
    _files_fingerprint,
    _image_mode,
    _in_memory,
    channel_stats,
    require_classes,
)


def _folder_splits(path: Path) -> dict[str, Path]:
    if not (path / "train").is_dir():
        raise DatasetNotFound(
            f"dataset {str(path)!r}: no train/ folder (expected {path}/train/<class>/<image> "
            "and test/ or val/, or train.csv and test.csv lists)"
        )
    splits = {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}
    if len(splits) == 1:
        raise DatasetNotFound(f"dataset {str(path)!r}: no test/ or val/ folder beside train/")
    return splits


def image_folder_dataset(path: str | os.PathLike) -> Dataset:
    """``<path>/{train,test|val}/<class>/<image>`` -> a file-backed dataset.

    A class folder without images is refused, or left out under --drop-empty-classes; the
    classes are train/'s, and a class with images elsewhere but none in train/ is refused."""
    path = Path(path).resolve()
    folders = _folder_splits(path)
    names = {s: formats.class_folders(d) for s, d in folders.items()}
    for split, found in names.items():
        if found != names["train"]:
            only_train = sorted(set(names["train"]) - set(found))
            only_here = sorted(set(found) - set(names["train"]))
            raise DatasetNotFound(
                f"dataset {str(path)!r}: class mismatch between train/ and {split}/ "
                f"(only in train: {only_train}; only in {split}: {only_here})"
            )
    listed = {s: formats.list_image_folder(d) for s, d in folders.items()}
    classes = listed["train"][0]
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, (kept, files, labels) in listed.items():
        if unknown := [c for c in kept if c not in index]:
            raise DatasetNotFound(
                f"dataset {str(path)!r}: class {unknown[0]!r} has images in {split}/ but "
                "none in train/"
            )
        remap = np.asarray([index[c] for c in kept], np.int64)  # split's classes -> train's
        splits[split] = Split(labels=remap[labels], files=files)
    channels, size = _image_mode(splits["train"].files, f"{path}/train")
    gray = channels == 1
    return Dataset(
        name=path.name,
        classes=classes,
        channels=channels,
        image_size=size,
        mean=IMAGENET_GRAY_MEAN if gray else IMAGENET_MEAN,
        std=IMAGENET_GRAY_STD if gray else IMAGENET_STD,
        source=str(path),
        license="unknown (user-provided)",
        loader=splits.__getitem__,
        split_names=[s for s in ("train", "val", "test") if s in splits],
        image_files=True,
    )


def npz_dataset(path: str | os.PathLike) -> Dataset:
    """An .npz with x_train, y_train, x_test, y_test (x_val/y_val, classes optional)."""
    path = Path(path).resolve()
    arrays, classes = formats.read_npz_splits(path)
    shape = arrays["train"][0].shape[1:]
    for split, (x, _) in arrays.items():
        if len(x) == 0:
            raise DatasetNotFound(f"dataset {str(path)!r}: split {split!r} is empty")
        if x.shape[1:] != shape:
            raise DatasetNotFound(
                f"dataset {str(path)!r}: x_{split} images are {x.shape[1:]}, x_train are {shape}"
            )
    top = max(int(y.max()) for _, y in arrays.values())
    if classes is None:
        classes = [str(i) for i in range(top + 1)]
    elif top >= len(classes):
        raise DatasetNotFound(
            f"dataset {str(path)!r}: label {top} but only {len(classes)} class names"
        )
    mean, std = channel_stats(arrays["train"][0])
    splits = _in_memory(arrays)
    ds = Dataset(
        name=path.stem,
        classes=classes,
        channels=int(shape[2]),
        image_size=shape[:2],
        mean=mean,
        std=std,
        source=str(path),
        license="unknown (user-provided)",
        loader=splits.__getitem__,
        split_names=[s for s in ("train", "val", "test") if s in splits],
        fingerprinter=_files_fingerprint("npz", [path]),
    )
    # The labels are in memory already (no decoding): a train split that covers one class
    # trains a constant model however many class names the file declares.
    present = len(np.unique(arrays["train"][1]))
    require_classes(repr(str(path)), present, f" in y_train ({len(classes)} declared)")
    return ds


def _listed_dataset(name: str, source: Path, parts: dict[str, list[tuple[str, str]]]) -> Dataset:
    """(file, label text) lists per split -> a file-backed dataset with shared class indices."""
    order = [s for s in formats.CSV_SPLITS if s in parts]
    texts = [label for s in order for _, label in parts[s]]
    classes, labels = formats.csv_labels(texts)
    splits, start = {}, 0
    for split in order:
        n = len(parts[split])
        splits[split] = Split(labels=labels[start : start + n], files=[f for f, _ in parts[split]])
        start += n
    channels, size = _image_mode(splits["train"].files, f"{source} (train)")
    gray = channels == 1
    return Dataset(
        name=name,
        classes=classes,
        channels=channels,
        image_size=size,
        mean=IMAGENET_GRAY_MEAN if gray else IMAGENET_MEAN,
        std=IMAGENET_GRAY_STD if gray else IMAGENET_STD,
        source=str(source),
        license="unknown (user-provided)",
        loader=splits.__getitem__,
        split_names=order,
        image_files=True,
    )


def csv_dataset(path: str | os.PathLike) -> Dataset:
    """A ``path,label,split`` CSV (split: train, test or val) -> a file-backed dataset."""
    path = Path(path).resolve()
    rows = formats.read_csv_list(path, need_split=True)
    parts = {
        s: [(f, label) for _, f, label, split in rows if split == s] for s in formats.CSV_SPLITS
    }
    if not parts["train"]:
        raise DatasetNotFound(f"dataset {str(path)!r}: no rows with split 'train'")
    if not parts["test"] and not parts["val"]:
        raise DatasetNotFound(f"dataset {str(path)!r}: no rows with split 'test' or 'val'")
    return _listed_dataset(path.stem, path, {s: p for s, p in parts.items() if p})


def csv_folder_dataset(path: str | os.PathLike) -> Dataset:
    """A folder with ``train.csv``, ``test.csv`` (``val.csv`` optional), each ``path,label``."""
    path = Path(path).resolve()
    if not (path / "test.csv").is_file():
        raise DatasetNotFound(f"dataset {str(path)!r}: train.csv but no test.csv beside it")
    parts = {}
    for split in formats.CSV_SPLITS:
        listing = path / f"{split}.csv"
        if not listing.is_file():
            continue
        parts[split] = [(f, label) for _, f, label, _ in formats.read_csv_list(listing, False)]
        if not parts[split]:
            raise DatasetNotFound(f"dataset {str(path)!r}: split {split!r} is empty ({listing})")
    return _listed_dataset(path.name, path, parts)
