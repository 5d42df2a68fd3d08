"""The experiment: datasets, teacher architectures and hyperparameters of every stage.

It lives in the workspace as a human-editable ``experiment.yaml``; presets fill it
in for a new workspace and command-line options override single values.
"""

from __future__ import annotations

import dataclasses
import os
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
    schedule: str = "cosine"  # constant | onecycle | onecycle-constant | cosine
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    # AutoAugment policy ("imagenet"): teachers and baselines draw it afresh every epoch;
    # the teach value also applies to cached views > 0, which students replay exactly.
    auto_augment: str | None = None
    peak_factor: float = 10.0  # onecycle-constant: the peak lr is peak_factor * lr
    # Weights of Linear/Conv2d layers: "default" keeps timm's; Algorithm 1 uses Xavier,
    # written as N(0, 2/(fan_in+fan_out)) ("xavier-normal"); "xavier" is Glorot uniform.
    init: str = "default"
    # Gradient accumulation (paper 4.3): batch_size is the effective batch; each optimiser
    # step accumulates grad_accum micro-batches of batch_size / grad_accum samples.
    grad_accum: int = 1

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


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
    # This dataset's own values for the teach / distill sections (paper Table 1 gives each
    # architecture its lr, batch size, weight decay, temperature, alpha and beta).
    teach: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)
    # A trained teacher to import instead of training one (paper 3: the teacher training
    # step "can be omitted"): a state-dict file (.safetensors, .pt/.pth/.bin).
    teacher: str | None = None


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
    dtype: str = "float16"  # float16 | bfloat16 | float32
    batch_size: int = 256
    codec: str = "zstd"  # zstd | lz4 | none (each chunk keeps its crc32c regardless)
    clevel: int = 5  # compression level 0-9
    # Where the teachers-L<K>.zarr / targets-L<K>.zarr stores live: a path or an fsspec URL
    # (file://, memory://, s3://, ...); default <workdir>/cache. Not part of any fingerprint.
    uri: str | None = None


@dataclass
class Experiment:
    preset: str = "custom"
    seed: int = 0
    levels: int = 2
    # > 0: every stage trains on the rest of each training split and measures on this
    # class-stratified fraction of it in place of the test split (a fixed draw), so that
    # recipes are chosen without looking at the test set.
    holdout: float = 0.0
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

    def stage(self, section: str, name: str | None = None):
        """The ``teach`` or ``distill`` config that dataset ``name``'s model trains with:
        the section, with the dataset's own values over it."""
        base = getattr(self, section)
        over = getattr(self.entry(name), section, None) if name is not None else None
        if not over:
            return base
        known = {f.name for f in dataclasses.fields(base)}
        unknown = sorted(set(over) - known)
        if unknown:
            raise MlfdError(f"datasets[{name}].{section}: unknown key(s) {', '.join(unknown)}")
        return dataclasses.replace(base, **over)

    def override(self, **values) -> None:
        """Command-line values for every training section; they also win over the
        datasets' own values, as a command line should."""
        values = {k: v for k, v in values.items() if v is not None}
        for section in ("teach", "fuse", "distill"):
            for key, v in values.items():
                setattr(getattr(self, section), key, v)
        for d in self.datasets:
            for over in (d.teach, d.distill):
                for key in values:
                    over.pop(key, None)

    def validate(self) -> None:
        """Every value that can be checked without data or models; one-line errors."""
        if len(self.datasets) < 2:
            raise MlfdError("an MLFD experiment needs at least two datasets (one teacher each)")
        names = self.names()
        if len(set(names)) != len(names):
            raise MlfdError(f"dataset names must be unique: {names}")
        if self.levels < 1:
            raise MlfdError(f"--levels must be >= 1, got {self.levels}")
        if not 0.0 <= self.holdout < 1.0:
            raise MlfdError(f"holdout must be a fraction in [0, 1), got {self.holdout}")
        for section in ("teach", "fuse", "distill"):
            _check_train(section, getattr(self, section))
        for d in self.datasets:
            for section in ("teach", "distill"):
                _check_train(f"datasets[{d.name}].{section}", self.stage(section, d.name))
        if self.cache.views < 1:
            raise MlfdError(f"cache.views must be >= 1, got {self.cache.views}")
        if self.cache.dtype not in CACHE_DTYPES:
            raise MlfdError(f"cache.dtype {self.cache.dtype!r}: choose {', '.join(CACHE_DTYPES)}")
        if self.cache.batch_size < 1:
            raise MlfdError(f"cache.batch_size must be >= 1, got {self.cache.batch_size}")
        from .cache.store import check_codec, check_uri

        check_codec(self.cache.codec, self.cache.clevel)
        if self.cache.uri is not None and (why := check_uri(str(self.cache.uri))):
            raise MlfdError(f"cache.uri {self.cache.uri!r}: {why}")
        for d in self.datasets:
            if d.input_size < 8:
                raise MlfdError(f"{d.name}: input_size must be >= 8, got {d.input_size}")

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
        tmp = path.with_name(path.name + ".tmp")  # a kill never leaves half a file
        tmp.write_text(
            "# mlfd experiment: edit freely; stages read it on every run.\n"
            + yaml.safe_dump(self.to_dict(), sort_keys=False)
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Experiment:
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise MlfdError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise MlfdError(f"{path}: expected a mapping at the top level")
        exp = cls.from_dict(data)
        for d in exp.datasets:
            d.source = resolve_source(str(d.source), path.parent.resolve())
            if d.teacher:
                d.teacher = str((path.parent.resolve() / Path(d.teacher).expanduser()).resolve())
        return exp


CACHE_DTYPES = ("float16", "bfloat16", "float32")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "onecycle", "onecycle-constant", "cosine")
INITS = ("default", "xavier", "xavier-normal")


def _check_train(section: str, cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise MlfdError(f"{section}.epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise MlfdError(f"{section}.batch_size must be >= 1, got {cfg.batch_size}")
    if not cfg.lr > 0:
        raise MlfdError(f"{section}.lr must be > 0, got {cfg.lr}")
    if cfg.optimizer.lower() not in OPTIMIZERS:
        raise MlfdError(f"{section}.optimizer {cfg.optimizer!r}: choose {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise MlfdError(f"{section}.schedule {cfg.schedule!r}: choose {', '.join(SCHEDULES)}")
    if not cfg.peak_factor >= 1:
        raise MlfdError(f"{section}.peak_factor must be >= 1, got {cfg.peak_factor}")
    if cfg.init not in INITS:
        raise MlfdError(f"{section}.init {cfg.init!r}: choose {', '.join(INITS)}")
    if isinstance(cfg, DistillConfig):
        if any(w < 0 for w in cfg.level_weights):
            raise MlfdError(f"{section}.level_weights must be >= 0, got {cfg.level_weights}")
        if cfg.temperature <= 0:
            raise MlfdError(f"{section}.temperature must be > 0, got {cfg.temperature}")
    if cfg.grad_accum < 1 or cfg.batch_size % cfg.grad_accum:
        raise MlfdError(f"{section}.grad_accum must be >= 1 and divide batch_size "
                        f"({cfg.batch_size}), got {cfg.grad_accum}")
    if not 0 <= cfg.label_smoothing < 1:
        raise MlfdError(f"{section}.label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    from .data.pipeline import check_auto_augment

    check_auto_augment(cfg.auto_augment)


def resolve_source(source: str, base: Path) -> str:
    """A dataset source as stored: registry names as they are, paths absolute.

    Relative paths are taken relative to ``base`` (the directory of experiment.yaml, or
    the current directory for a --teacher option), so a workdir works from anywhere."""
    from .data.registry import list_datasets

    if source in list_datasets() or Path(source).expanduser().is_absolute():
        return source
    return str((base / Path(source).expanduser()).resolve())


def short_name(source: str) -> str:
    """Directory-safe name of a dataset given by registry name or path."""
    stem = Path(source.rstrip("/")).name if ("/" in source or source.endswith(".npz")) else source
    stem = re.sub(r"\.npz$", "", stem)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "dataset"
