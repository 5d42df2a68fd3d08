"""Animal-MNIST: the two pickles of the animal-mnist 0.4 wheel, deduplicated and split."""

from __future__ import annotations

from pathlib import Path

from mlfd.data import formats
from mlfd.errors import DatasetNotFound

from .base import (
    _HOW_TO,
    Dataset,
    Split,
    _check_published,
    _files_fingerprint,
    _in_memory,
    _known,
    _once,
)
from .registry import register_dataset

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

ANIMAL_LICENSE = "MIT (Sina Mohammadi)"

ANIMAL_TEST_FRACTION, ANIMAL_SEED = 0.2, 0

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
        unpickles=True,
    )
