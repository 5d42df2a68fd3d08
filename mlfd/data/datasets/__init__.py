"""One registry of datasets: embedded demo subsets, full sets under a data root, custom paths.

``get_dataset(name_or_path)`` returns a :class:`Dataset` (metadata + lazy, memoised
``load(split)``); every "not there / not readable" case raises
:class:`~mlfd.errors.DatasetNotFound` with a one-line message naming the path it looked at.

One module per family: ``embedded`` (the demo sets in the package), ``mnist`` (MNIST and
Fashion-MNIST), ``animal``, ``cifar``, ``tinyimagenet``, ``sketch`` (ImageNet-Sketch) and
``custom`` (what a user brings); ``base`` holds what they share, ``registry`` the names.
Importing this package registers every built-in family.
"""

from . import animal, cifar, embedded, mnist, sketch, tinyimagenet  # noqa: F401 - registers them
from .base import (
    HOLDOUT_SEED,
    IMAGENET_GRAY_MEAN,
    IMAGENET_GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_CLASSES,
    Dataset,
    Split,
    channel_stats,
    holdout_indices,
    require_classes,
    set_trust_data,
    with_holdout,
)
from .custom import csv_dataset, csv_folder_dataset, image_folder_dataset, npz_dataset
from .embedded import EMBEDDED_DIR, MANIFEST_NAME, read_manifest
from .registry import (
    DatasetFactory,
    default_data_root,
    get_dataset,
    list_datasets,
    register_dataset,
)

__all__ = [
    "EMBEDDED_DIR", "HOLDOUT_SEED", "IMAGENET_GRAY_MEAN", "IMAGENET_GRAY_STD", "IMAGENET_MEAN",
    "IMAGENET_STD", "MANIFEST_NAME", "MIN_CLASSES", "Dataset", "DatasetFactory", "Split",
    "channel_stats", "csv_dataset", "csv_folder_dataset", "default_data_root", "get_dataset",
    "holdout_indices", "image_folder_dataset", "list_datasets", "npz_dataset", "read_manifest",
    "register_dataset", "require_classes", "set_trust_data", "with_holdout",
]
