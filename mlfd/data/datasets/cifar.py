"""CIFAR-10 and CIFAR-100 (the python pickles), downloaded md5-checked when absent."""

from __future__ import annotations

from pathlib import Path

from mlfd.data import download as dl
from mlfd.data import formats

from .base import Dataset, Split, _check_published, _files_fingerprint, _known, _not_found, _pending
from .registry import DatasetFactory, register_dataset

CIFAR_LICENSE = "no explicit license; cite Krizhevsky 2009 (Learning Multiple Layers of Features)"

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
            unpickles=True,
            **meta,
        )

    return factory


for _name in _CIFAR:
    register_dataset(_name, _cifar_factory(_name))
