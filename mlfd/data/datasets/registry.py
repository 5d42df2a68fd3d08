"""The registry: dataset names -> factories, and ``get_dataset`` for names and paths.

``get_dataset(name_or_path)`` returns a :class:`~mlfd.data.datasets.base.Dataset`; every
"not there / not readable" case raises :class:`~mlfd.errors.DatasetNotFound` with a
one-line message naming the path it looked at. The built-in families register themselves
when :mod:`mlfd.data.datasets` is imported (which importing this module does first).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mlfd.errors import DatasetNotFound

from .base import Dataset
from .custom import csv_dataset, csv_folder_dataset, image_folder_dataset, npz_dataset

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
