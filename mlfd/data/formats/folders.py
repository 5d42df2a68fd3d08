"""Listings of image files: ImageFolder trees, Tiny ImageNet's layout, CSV lists."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from mlfd.errors import DatasetNotFound

from .images import drop_empty_classes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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


def _read_text_lines(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetNotFound(f"dataset file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetNotFound(f"cannot read {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


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
