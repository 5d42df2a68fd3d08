"""What every dataset is: :class:`Split` and :class:`Dataset` (metadata + lazy, memoised
``load(split)``), the held-out validation view, fingerprints, channel statistics, and the
helpers the dataset families share (published-checksum checks, pending downloads)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlfd.data import formats
from mlfd.errors import DatasetNotFound, MlfdError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Grayscale folders: the average of the ImageNet channel statistics.
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = (0.449,), (0.226,)

_HOW_TO = "pass --data-root or set MLFD_DATA"


@dataclass
class Split:
    labels: np.ndarray
    images: np.ndarray | None = None
    files: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, np.int64)
        if (self.images is None) == (self.files is None):
            raise MlfdError("a Split holds either in-memory images or image files, not both")
        n = len(self.images) if self.images is not None else len(self.files)
        if n != len(self.labels):
            raise MlfdError(f"split has {n} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    classes: list[str]
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    license: str
    # How to read one split, which splits exist, how to identify the data (all lazy).
    loader: Callable[[str], Split] | None = field(default=None, repr=False, compare=False)
    split_names: list[str] = field(default_factory=lambda: ["train", "test"], repr=False)
    fingerprinter: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    # Set when the data is not there yet and this command may not fetch it (a dry run):
    # one line for the plan saying what a real run downloads; ``load`` then refuses.
    pending: str | None = field(default=None, repr=False, compare=False)
    # Every image is image_size (Tiny ImageNet): the scan refuses one of another size.
    fixed_size: bool = field(default=False, repr=False, compare=False)
    # Splits are image files on disk (the scan decodes them), not arrays: declared, so that
    # deciding whether to scan never loads (and never unpickles) anything.
    image_files: bool = field(default=False, repr=False, compare=False)
    # Loading it unpickles (MNIST's pickle, CIFAR, Animal-MNIST), restricted as that is: a
    # dry run must not, so what needs its size waits for a real run.
    unpickles: bool = field(default=False, repr=False, compare=False)
    # Rows left out of each split (bad images, --skip-bad-images): ``load`` omits them and
    # the fingerprint names them, so what was made without them is told apart.
    excluded: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)
    _loaded: dict[str, Split] = field(default_factory=dict, repr=False, compare=False)
    _kept: dict[str, Split] = field(default_factory=dict, repr=False, compare=False)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)
    _base_fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every source (registry names, embedded sets, folders, npz, CSV) builds a Dataset,
        # so this is the one place a degenerate class list is refused.
        require_classes(_describe(self.name, self.source), len(self.classes))
        self.image_size = tuple(int(s) for s in self.image_size)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def splits(self) -> list[str]:
        return list(self.split_names)

    def load(self, split: str) -> Split:
        """The split, without its excluded rows."""
        rows = self.excluded.get(split)
        if not rows:
            return self.load_all(split)
        if split not in self._kept:
            every = self.load_all(split)
            self._kept[split] = _subset(every, np.setdiff1d(np.arange(len(every)), rows))
        return self._kept[split]

    def load_all(self, split: str) -> Split:
        """The split with every row, excluded ones too (what the scan reads)."""
        if split not in self.split_names:
            raise MlfdError(
                f"dataset {self.name!r} has no split {split!r} "
                f"(available: {', '.join(self.split_names)})"
            )
        if split not in self._loaded:
            if self.loader is None:
                raise MlfdError(f"dataset {self.name!r} has no loader")
            self._loaded[split] = self.loader(split)
        return self._loaded[split]

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            base = self.base_fingerprint()
            if self.excluded:
                rows = json.dumps(self.excluded, sort_keys=True)
                base = hashlib.sha256(f"{base}|excluded={rows}".encode()).hexdigest()
            self._fingerprint = base
        return self._fingerprint

    def base_fingerprint(self) -> str:
        """The fingerprint of every row, excluded ones too."""
        if self._base_fingerprint is None:
            if self.fingerprinter is not None:
                self._base_fingerprint = self.fingerprinter()
            else:
                self._base_fingerprint = _splits_fingerprint(self)
        return self._base_fingerprint

    def exclude(self, rows: dict[str, list[int]]) -> None:
        """Leave these rows (split -> indices into ``load_all``) out from now on; an empty
        mapping brings every row back. In place, so every holder of this dataset (the
        stages' shared one) sees the same data."""
        clean = {s: tuple(sorted({int(i) for i in r})) for s, r in rows.items() if len(r)}
        if clean != self.excluded:
            self.excluded, self._fingerprint = clean, None
            self._kept.clear()


# The held-out images do not depend on the experiment's seed: every seed and every
# candidate recipe is compared on the same validation images.
HOLDOUT_SEED = 0


def holdout_indices(labels: np.ndarray, fraction: float, seed: int = HOLDOUT_SEED) -> np.ndarray:
    """Sorted indices of a class-stratified ``fraction`` of ``labels``: round(fraction * n_c)
    of every class c, at least one of each class with two or more images, never all of one."""
    labels = np.asarray(labels, np.int64)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = min(max(int(round(fraction * len(rows))), 1), len(rows) - 1)
        picked.append(rng.permutation(rows)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def _subset(split: Split, idx: np.ndarray) -> Split:
    if split.images is not None:
        return Split(labels=split.labels[idx], images=split.images[idx])
    return Split(labels=split.labels[idx], files=[split.files[i] for i in idx.tolist()])


def with_holdout(ds: Dataset, fraction: float) -> Dataset:
    """``ds`` with a validation set carved from its training split: ``train`` is the rest and
    ``test`` is the held-out part; the real test split is never read. Hyperparameters are
    chosen on this view of the data (``Experiment.holdout``), not on the test set."""
    if not 0.0 < fraction < 1.0:
        raise MlfdError(f"holdout must be a fraction between 0 and 1, got {fraction}")
    parts: dict[str, Split] = {}

    def load(split: str) -> Split:
        if not parts:
            train = ds.load("train")
            held = holdout_indices(train.labels, fraction)
            rest = np.setdiff1d(np.arange(len(train)), held, assume_unique=True)
            parts["train"], parts["test"] = _subset(train, rest), _subset(train, held)
        return parts[split]

    return Dataset(
        name=ds.name, classes=ds.classes, channels=ds.channels, image_size=ds.image_size,
        mean=ds.mean, std=ds.std, source=ds.source, license=ds.license, loader=load,
        split_names=["train", "test"], pending=ds.pending, fixed_size=ds.fixed_size,
        image_files=ds.image_files, unpickles=ds.unpickles,
        fingerprinter=lambda: hashlib.sha256(
            f"{ds.fingerprint()}|holdout={fraction!r}|seed={HOLDOUT_SEED}".encode()).hexdigest(),
    )


MIN_CLASSES = 2


def _describe(name: str, source: str) -> str:
    return repr(name) if name == source else f"{name!r} ({source})"


def require_classes(who: str, count: int, where: str = "") -> None:
    """Refuse a dataset with fewer than :data:`MIN_CLASSES` classes (top-1 would be trivial)."""
    if count < MIN_CLASSES:
        noun = "class" if count == 1 else "classes"
        raise MlfdError(
            f"dataset {who} has {count} {noun}{where}; "
            f"classification needs at least {MIN_CLASSES}"
        )


def _splits_fingerprint(ds: Dataset) -> str:
    """Content digest over every split: arrays' bytes, or file bytes for file-backed splits."""
    digest = hashlib.sha256(f"classes={ds.classes}".encode())
    for name in ds.splits():
        split = ds.load_all(name)
        digest.update(f"|{name}|".encode())
        digest.update(np.ascontiguousarray(split.labels).tobytes())
        if split.images is not None:
            digest.update(formats.arrays_sha256({"x": split.images}).encode())
        else:
            for f in split.files:
                digest.update(formats.file_sha256(f).encode())
    return digest.hexdigest()


def _files_fingerprint(recipe: str, files: list[Path]) -> Callable[[], str]:
    """Digest over the source files' sha256 plus how they are turned into splits."""

    def compute() -> str:
        digest = hashlib.sha256(recipe.encode())
        for f in files:
            digest.update(f"|{formats.file_sha256(f)}".encode())
        return digest.hexdigest()

    return compute


def _once(load_all: Callable[[], dict[str, Split]]) -> Callable[[str], Split]:
    """Adapt a reader that produces every split at once to a per-split loader."""
    cache: dict[str, dict[str, Split]] = {}

    def loader(split: str) -> Split:
        if "all" not in cache:
            cache["all"] = load_all()
        return cache["all"][split]

    return loader


# --trust-data: a pickle-based file whose checksum is none of the published ones (a user's
# own re-encoded copy) is read anyway, still with the restricted unpickler. Looked up when
# a file is read, not when its Dataset is made: the CLI sets it per command.
_TRUST = {"on": False}


def set_trust_data(on: bool) -> None:
    _TRUST["on"] = on


def _known(digests):
    """The published checksums to check a pickle-based file against; None under --trust-data."""
    return None if _TRUST["on"] else digests


def _check_published(files: dict[Path, frozenset[str]]) -> None:
    """Refuse a pickle-based file that is not the published one when the dataset is opened,
    so a dry run says what the real run would (hashing reads, it does not unpickle). The
    bytes are checked again when they are read (the file may change in between)."""
    if not _TRUST["on"]:
        for path, known in files.items():
            formats.verify_published(path, known)


def _pending(name: str, folder: Path, url: str, **meta) -> Dataset:
    """A dataset that is not there yet, for a command that fetches nothing (a dry run): the
    registry's metadata (class count, size, statistics) without the data, a placeholder
    fingerprint and a note for the plan."""

    def load(_split: str) -> Split:
        raise DatasetNotFound(
            f"dataset {name!r} is not in {folder} yet: a run without --dry-run downloads it"
        )

    return Dataset(
        name=name,
        source=f"{folder} (not downloaded yet)",
        loader=load,
        fingerprinter=lambda: f"not downloaded yet ({url})",
        pending=f"{name}: not in {folder} yet; a real run downloads it from {url}",
        **meta,
    )


def _in_memory(arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Split]:
    return {k: Split(labels=y, images=x) for k, (x, y) in arrays.items()}


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 NHWC images scaled to [0, 1] (exact integer sums)."""
    channels = images.shape[-1]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    for start in range(0, len(images), 4096):  # chunks keep the squared copy small
        chunk = images[start : start + 4096].reshape(-1, channels).astype(np.int64)
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
    n = images.size // channels
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    return (
        tuple(round(float(m) / 255.0, 6) for m in mean),
        tuple(round(float(s) / 255.0, 6) for s in std),
    )


def _not_found(name: str, looked: Path | str, what: str, download_hint: bool) -> DatasetNotFound:
    tail = ", or let mlfd download it" if download_hint else ""
    return DatasetNotFound(
        f"dataset {name!r} not found: looked in {looked} for {what}; {_HOW_TO}{tail}"
    )


def _image_mode(files: list[str], where: str) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) of the first image whose header reads: it stands for the
    dataset (sizes may vary). A bad image is left to the scan, which reports them all."""
    first = None
    for file in files:
        try:
            return formats.image_header(file)
        except formats.BadImage as e:
            first = first or e
    raise DatasetNotFound(f"no readable image in {where}" + (f" ({first})" if first else ""))
