"""The demo subsets shipped in the package (mnist-mini, fashion-mnist-mini,
animal-mnist-mini), checked against the sha256 in their manifest when read."""

from __future__ import annotations

import json
from pathlib import Path

from mlfd.data import formats
from mlfd.errors import DatasetNotFound

from .base import Dataset, Split, _in_memory, _once
from .registry import DatasetFactory, register_dataset

# The data files stay beside the datasets package, in mlfd/data/embedded/.
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded"
MANIFEST_NAME = "MANIFEST.json"


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
