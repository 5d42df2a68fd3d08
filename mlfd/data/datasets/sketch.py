"""ImageNet-Sketch: a class-folder tree the user unpacks, split by a seeded stratified split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlfd.data import formats
from mlfd.errors import DatasetNotFound

from .base import _HOW_TO, IMAGENET_MEAN, IMAGENET_STD, Dataset, Split, _image_mode
from .registry import register_dataset

SKETCH_FOLDER = "imagenet-sketch"
SKETCH_TEST_FRACTION, SKETCH_SEED = 0.2, 0
SKETCH_LICENSE = "unknown (images from Google Image search); cite Wang et al., NeurIPS 2019"


def _has_class_dirs(folder: Path) -> bool:
    return folder.is_dir() and bool(formats.class_folders(folder))


@register_dataset("imagenet-sketch")
def _imagenet_sketch(root: Path, _download: bool) -> Dataset:
    folder = root / SKETCH_FOLDER
    # The archive unpacks to sketch/<wnid>/; a flat <wnid>/ copy is accepted too.
    base = folder / "sketch" if (folder / "sketch").is_dir() else folder
    if not _has_class_dirs(base):
        # No canonical checksummed URL to download from.
        raise DatasetNotFound(
            f"dataset 'imagenet-sketch' not found: looked in {folder} for sketch/<wnid>/<image> "
            "(ImageNet-Sketch, distributed on Hugging Face and Kaggle; unpack it there); "
            f"{_HOW_TO}"
        )
    classes, files, labels = formats.list_image_folder(base)
    # No official split: a seeded stratified one over the sorted listing, so it does not
    # depend on the filesystem's listing order.
    train, test = formats.stratified_split(
        labels, SKETCH_TEST_FRACTION, SKETCH_SEED, salt="imagenet-sketch"
    )
    splits = {
        name: Split(labels=labels[idx], files=[files[i] for i in idx])
        for name, idx in (("train", np.sort(train)), ("test", np.sort(test)))
    }
    return Dataset(
        name="imagenet-sketch",
        classes=classes,
        channels=3,
        # Sizes vary; like an ImageFolder, the first training image stands for them.
        image_size=_image_mode(splits["train"].files, f"{base} (train)")[1],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=str(base),
        license=SKETCH_LICENSE,
        loader=splits.__getitem__,
        split_names=["train", "test"],
        image_files=True,
    )
