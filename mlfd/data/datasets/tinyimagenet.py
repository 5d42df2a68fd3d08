"""Tiny ImageNet (200 classes, 64x64): image files; the labelled val set serves as test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mlfd.data import download as dl
from mlfd.data import formats

from .base import IMAGENET_MEAN, IMAGENET_STD, Dataset, Split, _not_found, _pending
from .registry import register_dataset

TINYIMAGENET_FOLDER = "tiny-imagenet-200"
# The CS231n course's own link. Stanford publishes no checksum for it (the md5 quoted by
# third-party loaders could not be checked against an authoritative source), so the download
# is not checksum-verified; the layout checks below still catch a truncated or wrong archive.
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_LICENSE = "no explicit license; ImageNet terms of access apply (Stanford CS231n)"
_TINY_LAYOUT = "wnids.txt, words.txt, train/<wnid>/images/ and val/{images/,val_annotations.txt}"


def _tiny_complete(folder: Path) -> bool:
    return (
        (folder / "wnids.txt").is_file()
        and (folder / "train").is_dir()
        and (folder / "val" / "images").is_dir()
        and (folder / "val" / "val_annotations.txt").is_file()
    )


def _unique_names(wnids: list[str], words: dict[str, str]) -> list[str]:
    """words.txt names, else the wnid; a name shared by two wnids gets its wnid appended
    (ImageNet reuses some, e.g. 'crane'), so class names stay distinct."""
    names = [words.get(w, w) for w in wnids]
    counts = Counter(names)
    pairs = zip(names, wnids, strict=True)
    return [n if counts[n] == 1 else f"{n} ({w})" for n, w in pairs]


@register_dataset("tinyimagenet")
def _tinyimagenet(root: Path, download: bool) -> Dataset:
    folder = root / TINYIMAGENET_FOLDER
    if not _tiny_complete(folder) and download and not dl.fetch_allowed():
        # The class names come with the archive; a plan needs only their number.
        return _pending("tinyimagenet", folder, TINYIMAGENET_URL,
                        classes=[f"class {i}" for i in range(200)], channels=3,
                        image_size=(64, 64), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        license=TINYIMAGENET_LICENSE)
    if not _tiny_complete(folder) and download:
        archive = root / TINYIMAGENET_URL.rsplit("/", 1)[1]
        dl.fetch_and_extract(TINYIMAGENET_URL, archive, root)  # no checksum: see the URL
    if not _tiny_complete(folder):
        raise _not_found("tinyimagenet", folder, _TINY_LAYOUT, not download)
    wnids = formats.read_wnids(folder / "wnids.txt")

    def load(split: str) -> Split:
        # The official test set has no labels, so the labelled val set serves as "test".
        if split == "train":
            files, labels = formats.list_tinyimagenet_train(folder / "train", wnids)
        else:
            files, labels = formats.read_tinyimagenet_val(folder / "val", wnids)
        return Split(labels=labels, files=files)

    return Dataset(
        name="tinyimagenet",
        classes=_unique_names(wnids, formats.read_words(folder / "words.txt")),
        channels=3,
        image_size=(64, 64),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=f"{folder} ({TINYIMAGENET_URL})",
        license=TINYIMAGENET_LICENSE,
        loader=load,
        split_names=["train", "test"],
        fixed_size=True,
        image_files=True,
    )
