"""Low-level readers for the on-disk dataset formats, plus dedupe and seeded splitting.

Every reader returns plain numpy arrays (images uint8 NHWC, labels int64) and raises
:class:`~mlfd.errors.DatasetNotFound` with the offending path when a file is missing or
malformed, so the registry can pass the message straight to the user.

By concern: ``arrays`` (digests, labels, IDX, npz), ``pickles`` (the restricted unpickler
and the pickle-based sets), ``images`` (decoding, pixel limits), ``folders`` (ImageFolder,
Tiny ImageNet and CSV listings), ``splits`` (dedupe, stratified splits).
"""

from .arrays import (
    arrays_sha256,
    as_labels,
    file_sha256,
    find_idx_file,
    read_idx,
    read_idx_pair,
    read_npz_splits,
    to_uint8_images,
    write_idx,
    write_npz_deterministic,
)
from .folders import (
    CSV_SPLITS,
    IMAGE_EXTENSIONS,
    class_folders,
    csv_labels,
    image_files,
    list_image_folder,
    list_tinyimagenet_train,
    read_csv_list,
    read_tinyimagenet_val,
    read_wnids,
    read_words,
)
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    GRAY_MODES,
    BadImage,
    check_pixels,
    drop_empty_classes,
    image_header,
    max_image_pixels,
    open_image,
    read_image,
    set_image_policy,
)
from .pickles import (
    ChecksumMismatch,
    UnsafePickle,
    mnist_float_to_uint8,
    read_animal_pickles,
    read_cifar_batches,
    read_cifar_meta,
    read_mnist_pickle,
    read_verified,
    verify_published,
)
from .splits import dedupe, dedupe_and_split, seeded_order, stratified_sample, stratified_split

__all__ = [
    "CSV_SPLITS", "DEFAULT_MAX_IMAGE_PIXELS", "GRAY_MODES", "IMAGE_EXTENSIONS", "BadImage",
    "ChecksumMismatch", "UnsafePickle", "arrays_sha256", "as_labels", "check_pixels",
    "class_folders", "csv_labels", "dedupe", "dedupe_and_split", "drop_empty_classes",
    "file_sha256", "find_idx_file", "image_files", "image_header", "list_image_folder",
    "list_tinyimagenet_train", "max_image_pixels", "mnist_float_to_uint8", "open_image",
    "read_animal_pickles", "read_cifar_batches", "read_cifar_meta", "read_csv_list", "read_idx",
    "read_idx_pair", "read_image", "read_mnist_pickle", "read_npz_splits",
    "read_tinyimagenet_val", "read_verified", "read_wnids", "read_words", "seeded_order",
    "set_image_policy", "stratified_sample", "stratified_split", "to_uint8_images",
    "verify_published", "write_idx", "write_npz_deterministic",
]
