"""The experiment: datasets, teacher architectures and hyperparameters of every stage.

It lives in the workspace as a human-editable ``experiment.yaml``; presets fill it
in for a new workspace and command-line options override single values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import reprlib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    AllowInfNan,
    ConfigDict,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    with_config,
)
from typing_extensions import TypedDict, is_typeddict

from .errors import MlfdError

# --- the schema's value types --------------------------------------------------------
# The dataclasses below are the schema: pydantic validates experiment.yaml against their
# annotations. Strict() everywhere: "2" is not an integer, 1.5 or true are not epochs.
# Ranges that older messages already state (holdout, cache.clevel, choices such as
# optimizer) stay in ``Experiment.validate``.
NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
NAME_RULE = "a name of letters, digits, '-', '_' and '.' (not first)"
# Becomes a directory name (teachers/<name>, baselines/<kind>-<arch>, mlfd-runs/<preset>):
# no separators and no leading dot, so no '..' and nothing hidden.
Name = Annotated[str, Strict(), StringConstraints(pattern=NAME_PATTERN)]
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]
NonNegativeInt = Annotated[int, Strict(), Ge(0)]
Count = Annotated[int, Strict(), Ge(1)]
Number = Annotated[float, Strict(), AllowInfNan(False)]
Positive = Annotated[float, Strict(), AllowInfNan(False), Gt(0)]
NonNegative = Annotated[float, Strict(), AllowInfNan(False), Ge(0)]
Fraction = Annotated[float, Strict(), Ge(0), Lt(1)]
# torch.manual_seed takes at most 64 bits; numpy's generators refuse negative seeds.
Seed = Annotated[int, Strict(), Ge(0), Le(2**64 - 1)]
Pixels = Annotated[int, Strict(), Ge(8)]
AtLeastOne = Annotated[float, Strict(), AllowInfNan(False), Ge(1)]
_FORBID = ConfigDict(extra="forbid")  # an unknown key is an error, with a hint


@with_config(_FORBID)
@dataclass
class TrainConfig:
    epochs: Count = 10
    batch_size: Count = 128
    lr: Positive = 1e-3
    optimizer: Text = "adamw"  # adamw | adam | sgd
    schedule: Text = "cosine"  # constant | onecycle | onecycle-constant | cosine
    weight_decay: NonNegative = 0.05
    label_smoothing: Fraction = 0.0
    warmup_epochs: NonNegative = 0.0
    # AutoAugment policy ("imagenet"): teachers and baselines draw it afresh every epoch;
    # the teach value also applies to cached views > 0, which students replay exactly.
    auto_augment: Text | None = None
    peak_factor: AtLeastOne = 10.0  # onecycle-constant: the peak lr is peak_factor * lr
    # Weights of Linear/Conv2d layers: "default" keeps timm's; Algorithm 1 uses Xavier,
    # written as N(0, 2/(fan_in+fan_out)) ("xavier-normal"); "xavier" is Glorot uniform.
    init: Text = "default"
    # Gradient accumulation (paper 4.3): batch_size is the effective batch; each optimiser
    # step accumulates grad_accum micro-batches of batch_size / grad_accum samples.
    grad_accum: Count = 1
    # A budget in images seen or optimiser steps instead of epochs (the dataset-specific
    # models: epochs = ceil(images / dataset size)); see mlfd.engine.budget.
    # (repr=False: the repr, which recipe digests read, is as before while they are unset)
    images: Count | None = field(default=None, repr=False)
    steps: Count | None = field(default=None, repr=False)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


@with_config(_FORBID)
@dataclass
class FuseConfig(TrainConfig):
    width: Count = 256  # channels of the fused maps
    embed_dim: Count = 256  # width of the joint L1 vector
    dropout: Fraction = 0.85  # before the dense L1 layer (paper: 0.8-0.9)


@with_config(_FORBID)
@dataclass
class DistillConfig(TrainConfig):
    ce_weight: NonNegative = 1.0  # g
    soft_weight: NonNegative = 0.6  # a
    temperature: Positive = 2.0  # T
    level_weights: list[NonNegative] = field(default_factory=lambda: [0.2, 0.2])  # b_1..b_K
    loss_backend: Text = "auto"


def _overrides(section: type, name: str) -> type:
    """The schema of a dataset's own values for ``section``: any of its keys, same types.
    Unknown keys pass here; ``Experiment.stage`` names them with the dataset."""
    hints = get_type_hints(section, include_extras=True)
    values = TypedDict(name, {f.name: hints[f.name] for f in dataclasses.fields(section)},
                       total=False)
    return with_config(ConfigDict(extra="allow"))(values)


TeachValues = _overrides(TrainConfig, "TeachValues")
DistillValues = _overrides(DistillConfig, "DistillValues")


@with_config(_FORBID)
@dataclass
class DatasetEntry:
    name: Name  # short name used for directories and tables
    source: Text  # registry name or a path
    arch: Name  # timm architecture of the teacher and the student
    input_size: Pixels = 224
    hflip: Flag = True  # whether mirrored views are label-preserving
    drop_rate: Fraction = 0.0
    drop_path_rate: Fraction = 0.0
    # Keyword arguments of the timm model (checked against it by ``check_model_kwargs``).
    model_kwargs: dict[Text, Any] = field(default_factory=dict)
    # This dataset's own values for the teach / distill sections (paper Table 1 gives each
    # architecture its lr, batch size, weight decay, temperature, alpha and beta).
    teach: TeachValues = field(default_factory=dict)
    distill: DistillValues = field(default_factory=dict)
    # A trained teacher to import instead of training one (paper 3: the teacher training
    # step "can be omitted"): a state-dict file (.safetensors, .pt/.pth/.bin).
    teacher: Text | None = None


@with_config(_FORBID)
@dataclass
class CacheConfig:
    views: Count = 4  # cached views per training image (view 0 = clean)
    # float16 | bfloat16 | float32 | int8 (targets: int8 with a float32 scale per row and
    # view, per channel for maps; the teacher-embedding cache stays float16)
    dtype: Text = "float16"
    # > 0: store only each target row's top-K logits (and their class indices) and the row's
    # minimum, which stands for every other logit when the soft-CE reads them back
    logits_topk: NonNegativeInt = 0
    batch_size: Count = 256
    codec: Text = "zstd"  # zstd | lz4 | none (each chunk keeps its crc32c regardless)
    # compression level 0-9. 1: zstd 5 made files 1-2 % smaller for a several times slower
    # write (bench/cache.py); a workdir keeps the level its experiment.yaml names
    clevel: Int = 1
    # Where the teachers-L<K>.zarr / targets-L<K>.zarr stores live: a path or an fsspec URL
    # (file://, memory://, s3://, ...); default <workdir>/cache. Not part of any fingerprint.
    uri: Text | None = None


@with_config(_FORBID)
@dataclass
class Experiment:
    preset: Name = "custom"
    seed: Seed = 0
    levels: Count = 2
    # > 0: every stage trains on the rest of each training split and measures on this
    # class-stratified fraction of it in place of the test split (a fixed draw), so that
    # recipes are chosen without looking at the test set.
    holdout: Number = 0.0
    # How long the teachers and students train (mlfd.engine.budget): "fixed" (the sections'
    # epochs) or "equal-images"; unset: equal-images for custom experiments, fixed for
    # presets.
    budget: Text | None = None
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

    def stage(self, section: str, name: str | None = None, budgeted: bool = True):
        """The ``teach`` or ``distill`` config that dataset ``name``'s model trains with:
        the section, with the dataset's own values over it, then its budget (epochs, batch
        size) where the stages gave the experiment its data sizes (``budget_hook``)."""
        cfg = self._stage(section, name)
        hook = getattr(self, "budget_hook", None)
        if budgeted and hook is not None and name is not None:
            return hook(section, self.entry(name).name, cfg)
        return cfg

    def _stage(self, section: str, name: str | None):
        base = getattr(self, section)
        over = getattr(self.entry(name), section, None) if name is not None else None
        if not over:
            return base
        known = {f.name for f in dataclasses.fields(base)}
        unknown = sorted(set(over) - known)
        if unknown:
            hints = [h[0] for k in unknown if (h := difflib.get_close_matches(k, known, n=1))]
            raise MlfdError(f"datasets[{name}].{section}: unknown key(s) {', '.join(unknown)}"
                            + (f" (did you mean {', '.join(map(repr, hints))}?)" if hints else ""))
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
        """Every value that can be checked without data or models; one-line errors.

        The schema first (types and ranges, the key path named), then what involves
        several values."""
        check_schema(self.to_dict())
        if len(self.datasets) < 2:
            raise MlfdError("an MLFD experiment needs at least two datasets (one teacher each)")
        names = self.names()
        if len(set(names)) != len(names):
            raise MlfdError(f"dataset names must be unique: {names}")
        if not 0.0 <= self.holdout < 1.0:
            raise MlfdError(f"holdout must be a fraction in [0, 1), got {self.holdout}")
        if self.budget is not None and self.budget not in BUDGETS:
            raise MlfdError(f"budget {self.budget!r}: choose {', '.join(BUDGETS)}")
        for section in ("teach", "fuse", "distill"):
            _check_train(section, getattr(self, section))
        if self.fuse.images or self.fuse.steps:
            raise MlfdError("fuse.images / fuse.steps: the joint teacher's budget is in "
                            "epochs (fuse.epochs)")
        for d in self.datasets:
            for section in ("teach", "distill"):
                _check_train(f"datasets[{d.name}].{section}",
                             self.stage(section, d.name, budgeted=False))
        if self.cache.dtype not in CACHE_DTYPES:
            raise MlfdError(f"cache.dtype {self.cache.dtype!r}: choose {', '.join(CACHE_DTYPES)}")
        from .storage.uri import check_uri

        check_codec(self.cache.codec, self.cache.clevel)
        if self.cache.uri is not None and (why := check_uri(str(self.cache.uri))):
            raise MlfdError(f"cache.uri {self.cache.uri!r}: {why}")

    def check_locations(self, root: Path) -> None:
        """Refuse a workdir or a local cache location inside a dataset's own folder: an
        image-folder scan would read the results as data, and cleaning them could reach
        into the dataset."""
        root = Path(root).expanduser().resolve()
        places = [(f"workdir {root}", root)]
        if self.cache.uri:
            from .storage.uri import cache_root

            where = cache_root(str(self.cache.uri), root)
            if isinstance(where, Path):  # a local path or file:// URL
                where = where.expanduser().resolve()
                places.append((f"cache.uri {self.cache.uri!r} ({where})", where))
        for i, d in enumerate(self.datasets):
            source = Path(d.source).expanduser()
            if not (source.is_absolute() and source.is_dir()):  # registry names, files
                continue
            source = source.resolve()
            for what, place in places:
                if place.is_relative_to(source):
                    raise MlfdError(f"{what} is inside datasets[{i}].source {source} "
                                    f"(dataset {d.name!r}): choose a location outside it")

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # unset budget keys are left out: files (and recipe digests) of experiments that
        # do not use them read as before
        if d.get("budget") is None:
            d.pop("budget", None)
        for section in ("teach", "fuse", "distill"):
            for key in BUDGET_KEYS:
                if d[section].get(key) is None:
                    d[section].pop(key, None)
        if not d["cache"].get("logits_topk"):  # likewise: unset (0), top-K is left out
            d["cache"].pop("logits_topk", None)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Experiment:
        check_schema(d)
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
            data = yaml.load(path.read_text(), Loader=_Loader)
        except yaml.YAMLError as e:
            raise MlfdError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise MlfdError(f"{path}: expected a mapping at the top level")
        try:
            exp = cls.from_dict(data)
        except MlfdError as e:
            raise MlfdError(f"{path}: {e}") from None
        for d in exp.datasets:
            d.source = resolve_source(str(d.source), path.parent.resolve())
            if d.teacher:
                d.teacher = str((path.parent.resolve() / Path(d.teacher).expanduser()).resolve())
        return exp


BUDGET_KEYS = ("images", "steps")
BUDGETS = ("fixed", "equal-images")  # mlfd.engine.budget.RULES
CACHE_DTYPES = ("float16", "bfloat16", "float32", "int8")
CODECS = ("zstd", "lz4", "none")  # cache.codec: Blosc's compressor, or none
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "onecycle", "onecycle-constant", "cosine")
INITS = ("default", "xavier", "xavier-normal")


def _check_train(section: str, cfg: TrainConfig) -> None:
    """What the schema cannot say about one training section: choices and relations."""
    if cfg.optimizer.lower() not in OPTIMIZERS:
        raise MlfdError(f"{section}.optimizer {cfg.optimizer!r}: choose {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise MlfdError(f"{section}.schedule {cfg.schedule!r}: choose {', '.join(SCHEDULES)}")
    if cfg.init not in INITS:
        raise MlfdError(f"{section}.init {cfg.init!r}: choose {', '.join(INITS)}")
    if cfg.batch_size % cfg.grad_accum:
        raise MlfdError(f"{section}.grad_accum must be >= 1 and divide batch_size "
                        f"({cfg.batch_size}), got {cfg.grad_accum}")
    if cfg.images and cfg.steps:
        raise MlfdError(f"{section}: give images or steps, not both")
    if cfg.warmup_epochs > cfg.epochs:
        raise MlfdError(f"{section}.warmup_epochs {cfg.warmup_epochs:g} is longer than the "
                        f"training ({section}.epochs {cfg.epochs})")
    from .data.pipelines import check_auto_augment

    check_auto_augment(cfg.auto_augment)


# --- schema checks -------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """PyYAML's YAML 1.1 reads 1e-3 as a string; YAML 1.2 (and a person) reads a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


@functools.cache
def _schema() -> TypeAdapter:
    return TypeAdapter(Experiment)


def check_schema(data: dict) -> None:
    """Validate an experiment as a plain dict (experiment.yaml, or ``to_dict()`` of one
    built in code) against the dataclasses' annotations; the first error as one line
    naming its key path."""
    try:
        _schema().validate_python(data)
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise MlfdError(_explain(errors[0], data) + more) from None


@functools.cache
def _field_schema(owner: type, key: str) -> tuple[Any, TypeAdapter]:
    tp = get_type_hints(owner, include_extras=True)[key]
    return tp, TypeAdapter(tp)


def check_value(owner: type, key: str, value) -> str | None:
    """What field ``key`` of dataclass ``owner`` expects, if ``value`` is not that: the
    command line's values go through the same schema as experiment.yaml's."""
    tp, adapter = _field_schema(owner, key)
    try:
        adapter.validate_python(value)
    except ValidationError:
        return _describe(tp)
    return None


def _explain(error: dict, data) -> str:
    """``key.path: what was wrong`` for one pydantic error."""
    loc, keys, value = error["loc"], [], data
    for i, k in enumerate(loc):  # the path through the input, without pydantic's own tags
        if isinstance(value, dict) and k in value or \
                isinstance(value, list) and isinstance(k, int) and 0 <= k < len(value):
            keys.append(k)
            value = value[k]
        elif i == len(loc) - 1 and error["type"] in ("missing", "missing_argument"):
            keys.append(k)
    path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")
    path = path or "experiment"
    got = _short(error["input"])
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        known = list(_fields(_bare(_type_at(keys[:-1]))) or ())
        hint = difflib.get_close_matches(str(keys[-1]), known, n=1)
        return f"{path}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else
                                         f" (known: {', '.join(known)})")
    if error["type"] in ("missing", "missing_argument"):
        return f"{path}: required, missing"
    if "[key]" in loc:
        return f"{path}: keys must be strings, got {got}"
    tp = _type_at(keys)
    return f"{path}: expected {_describe(tp) if tp is not None else error['msg']}, got {got}"


def _short(value) -> str:
    r = reprlib.Repr()
    r.maxstring, r.maxother = 60, 60
    return r.repr(value)


def _bare(tp):
    """``tp`` without Annotated[...] and without ``| None``."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in get_args(tp) if a is not type(None))
        return _bare(tp)
    return tp


def _fields(tp) -> dict | None:
    if dataclasses.is_dataclass(tp) or is_typeddict(tp):
        return get_type_hints(tp, include_extras=True)
    return None


def _type_at(keys: list):
    """The annotated type of the value at ``keys`` in an experiment (None if unknown)."""
    tp = Experiment
    for k in keys:
        tp = _bare(tp)
        fields = _fields(tp)
        if fields is not None:
            if k not in fields:
                return None
            tp = fields[k]
        elif get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]
        else:
            return None
    return tp


def _describe(tp) -> str:
    """What a value of annotated type ``tp`` must be, in words: 'an integer >= 1'."""
    meta = []
    if get_origin(tp) is Annotated:
        tp, *meta = get_args(tp)
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if any(isinstance(m, StringConstraints) and m.pattern for m in meta):
        return NAME_RULE
    origin = get_origin(tp) or tp
    if origin is list:
        return f"a list, each {_describe(get_args(tp)[0])}"
    if origin is dict or _fields(origin) is not None:
        return "a mapping"
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        origin, "a valid value")
    if any(isinstance(m, AllowInfNan) and not m.allow_inf_nan for m in meta):
        kind = "a finite number"
    bound = {type(m): getattr(m, type(m).__name__.lower()) for m in meta
             if isinstance(m, (Ge, Gt, Le, Lt))}
    low = next((f"{'[' if t is Ge else '('}{bound[t]}" for t in (Ge, Gt) if t in bound), None)
    high = next((f"{bound[t]}{']' if t is Le else ')'}" for t in (Le, Lt) if t in bound), None)
    if low and high:
        return f"{kind} in {low}, {high}"
    if low:
        return f"{kind} {'>=' if Ge in bound else '>'} {low[1:]}"
    if high:
        return f"{kind} {'<=' if Le in bound else '<'} {high[:-1]}"
    return kind


def check_model_kwargs(entry: DatasetEntry, index: int) -> None:
    """Refuse ``model_kwargs`` that the timm model does not take: it is built on the meta
    device (no memory, no weights) as ``create_backbone`` builds it. A model that cannot
    be built there even without them is left to the real build."""
    if not entry.model_kwargs:
        return
    import inspect

    import timm  # after the package's torchvision shim (mlfd/__init__.py)
    import torch

    drops = {"drop_path_rate": entry.drop_path_rate} if entry.drop_path_rate else {}

    def build(**kwargs):
        with torch.device("meta"):
            return timm.create_model(entry.arch, pretrained=False, num_classes=2,
                                     drop_rate=entry.drop_rate, **drops, **kwargs)

    try:
        build(**entry.model_kwargs)
        return
    except Exception as e:  # whatever the model raises is the answer
        error = e
    try:
        model = build()
    except Exception:  # not buildable on meta: the real build reports
        return
    where = f"datasets[{index}].model_kwargs"
    if m := re.search(r"unexpected keyword argument '(\w+)'", str(error)):
        params = [p for p in inspect.signature(type(model)).parameters
                  if p not in ("args", "kwargs")]
        hint = difflib.get_close_matches(m.group(1), params, n=1)
        raise MlfdError(f"{where}.{m.group(1)}: unknown key: timm's {entry.arch} "
                        f"({type(model).__name__}) takes no such argument"
                        + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    first = (str(error).strip().splitlines() or [""])[0]
    raise MlfdError(f"{where}: timm model {entry.arch!r} refused them "
                    f"({type(error).__name__}: {first})")


def resolve_source(source: str, base: Path) -> str:
    """A dataset source as stored: registry names as they are, paths absolute.

    Relative paths are taken relative to ``base`` (the directory of experiment.yaml, or
    the current directory for a --teacher option), so a workdir works from anywhere."""
    from .data.datasets import list_datasets

    if source in list_datasets() or Path(source).expanduser().is_absolute():
        return source
    return str((base / Path(source).expanduser()).resolve())


def short_name(source: str) -> str:
    """Directory-safe name of a dataset given by registry name or path."""
    stem = Path(source.rstrip("/")).name if ("/" in source or source.endswith(".npz")) else source
    stem = re.sub(r"\.npz$", "", stem)
    # no leading '.': the name is a directory, and must not be hidden or '..'
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).lstrip(".-").rstrip("-") or "dataset"


def check_codec(codec: str, clevel) -> None:
    if codec not in CODECS:
        raise MlfdError(f"cache.codec {codec!r}: choose {', '.join(CODECS)}")
    if isinstance(clevel, bool) or not isinstance(clevel, int) or not 0 <= clevel <= 9:
        raise MlfdError(f"cache.clevel must be an integer from 0 to 9, got {clevel!r}")
