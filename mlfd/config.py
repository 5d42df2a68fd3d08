"""The experiment: datasets, teacher architectures and hyperparameters of every stage.

It lives in the workspace as a human-editable ``experiment.yaml``; presets fill it
in for a new workspace and command-line options override single values.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import MlfdError


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | adam | sgd
    schedule: str = "cosine"  # constant | onecycle | cosine
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    # AutoAugment policy ("imagenet") for image-fed training without cached targets
    # (teachers, baselines); distillation ignores it since its views must replay exactly.
    auto_augment: str | None = None


@dataclass
class DatasetEntry:
    name: str  # short name used for directories and tables
    source: str  # registry name or a path
    arch: str  # timm architecture of the teacher and the student
    input_size: int = 224
    hflip: bool = True  # whether mirrored views are label-preserving
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    model_kwargs: dict = field(default_factory=dict)


@dataclass
class FuseConfig(TrainConfig):
    width: int = 256  # channels of the fused maps
    embed_dim: int = 256  # width of the joint L1 vector
    dropout: float = 0.85  # before the dense L1 layer (paper: 0.8-0.9)


@dataclass
class DistillConfig(TrainConfig):
    ce_weight: float = 1.0  # g
    soft_weight: float = 0.6  # a
    temperature: float = 2.0  # T
    level_weights: list[float] = field(default_factory=lambda: [0.2, 0.2])  # b_1..b_K
    loss_backend: str = "auto"


@dataclass
class CacheConfig:
    views: int = 4  # cached views per training image (view 0 = clean)
    dtype: str = "float16"
    batch_size: int = 256


@dataclass
class Experiment:
    preset: str = "custom"
    seed: int = 0
    levels: int = 2
    datasets: list[DatasetEntry] = field(default_factory=list)
    teach: TrainConfig = field(default_factory=TrainConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def entry(self, name: str) -> DatasetEntry:
        for d in self.datasets:
            if name in (d.name, d.source):
                return d
        known = ", ".join(d.name for d in self.datasets) or "none"
        raise MlfdError(f"dataset {name!r} is not part of this experiment (it has: {known})")

    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def validate(self) -> None:
        if len(self.datasets) < 2:
            raise MlfdError("an MLFD experiment needs at least two datasets (one teacher each)")
        names = self.names()
        if len(set(names)) != len(names):
            raise MlfdError(f"dataset names must be unique: {names}")
        if self.levels < 1:
            raise MlfdError(f"--levels must be >= 1, got {self.levels}")

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Experiment:
        try:
            d = dict(d)
            d["datasets"] = [DatasetEntry(**x) for x in d.get("datasets", [])]
            for key, typ in (("teach", TrainConfig), ("fuse", FuseConfig),
                             ("distill", DistillConfig), ("cache", CacheConfig)):
                d[key] = typ(**d.get(key, {}))
            return cls(**d)
        except TypeError as e:
            raise MlfdError(f"experiment file: {e}") from None

    def save(self, path: Path) -> None:
        path.write_text(
            "# mlfd experiment: edit freely; stages read it on every run.\n"
            + yaml.safe_dump(self.to_dict(), sort_keys=False)
        )

    @classmethod
    def load(cls, path: Path) -> Experiment:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise MlfdError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise MlfdError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data)


def short_name(source: str) -> str:
    """Directory-safe name of a dataset given by registry name or path."""
    stem = Path(source.rstrip("/")).name if ("/" in source or source.endswith(".npz")) else source
    stem = re.sub(r"\.npz$", "", stem)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "dataset"
