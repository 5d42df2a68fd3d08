"""What several stages share: datasets, input specs, loading teachers, evaluation passes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import __version__
from ..config import BUDGET_KEYS
from ..data.datasets import Dataset, get_dataset, with_holdout
from ..data.download import fetch_allowed
from ..data.pipelines import InputSpec, build_pipeline
from ..data.sampling import eval_order
from ..data.views import ViewConfig
from ..engine.artifact import Artifact, Status
from ..engine.budget import Budget, budget, resolve, rule_of
from ..engine.checkpoint import load_into, load_meta
from ..engine.distributed import rank, world
from ..engine.metrics import Accuracy
from ..errors import MlfdError
from ..fastpaths import pipeline_backend, precision
from ..models import build_level_backbone
from ..workspace import Workspace


@dataclass
class RunOptions:
    """Per-invocation settings that are not part of the experiment."""

    device: torch.device
    pipeline: str = "auto"
    loss_backend: str | None = None
    force: bool = False  # redo a stage whose result is up to date
    restart: bool = False  # do not resume a staged (interrupted) run
    # "tensorboard": training runs also write TensorBoard event files into their directory
    # (applied per process with mlfd.engine.metrics.set_tensorboard, as the CLI does).
    log: str | None = None
    # distill: bytes of decoded targets to hold in memory; bigger caches are streamed
    # (None: half the free memory, shared by the run's processes on the machine; see
    # stages.distill.cache_budget)
    cache_memory: int | None = None
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (mlfd.fastpaths.precision)
    fast: dict = field(default_factory=dict)  # fast-path choices made for this run (fastpaths)


_DATASETS: dict[tuple, Dataset] = {}


def dataset_of(ws: Workspace, name: str) -> Dataset:
    """The data of dataset ``name`` as the experiment sees it: with ``holdout`` set, its
    "test" split is the part held out of train (see ``registry.with_holdout``)."""
    entry = ws.exp.entry(name)
    install_budget(ws)
    key = (entry.source, ws.data_root, ws.exp.holdout)
    if key not in _DATASETS:
        ds = get_dataset(entry.source, ws.data_root)
        _DATASETS[key] = with_holdout(ds, ws.exp.holdout) if ws.exp.holdout else ds
    return _DATASETS[key]


def train_sizes(ws: Workspace) -> dict[str, int] | None:
    """Training images per dataset (after any holdout); None while a dataset is only
    planned for (a dry run's pending download), or when a dry run would have to unpickle
    it to count (a dry run reads no pickle)."""
    sizes = {}
    for e in ws.exp.datasets:
        ds = dataset_of(ws, e.name)
        if ds.pending or (ds.unpickles and not fetch_allowed()):
            return None
        sizes[e.name] = len(ds.load("train"))
    return sizes


def install_budget(ws: Workspace) -> None:
    """Let ``ws.exp.stage`` size each teacher's and student's training by the budget rule
    (mlfd.engine.budget), which needs the datasets' sizes; presets keep their values."""
    if getattr(ws.exp, "budget_hook", None) is not None:
        return

    def hook(section: str, name: str, cfg):
        if section not in ("teach", "distill"):
            return cfg
        if rule_of(ws.exp) == "fixed" and not (cfg.images or cfg.steps):
            return cfg  # nothing to size: no data read
        sizes = train_sizes(ws)
        return cfg if sizes is None else resolve(ws.exp, section, name, cfg, sizes)

    ws.exp.budget_hook = hook


def drop_unset(fp: dict) -> dict:
    """A flat fingerprint without unset budget keys (``teach.images: None``), so results
    made before those keys existed stay up to date."""
    return {k: v for k, v in fp.items() if not (v is None and k.rsplit(".", 1)[-1] in
                                                BUDGET_KEYS)}


def model_budget(ws: Workspace, section: str, name: str) -> Budget | None:
    """The budget of dataset ``name``'s teacher or student (None: data not there yet)."""
    sizes = train_sizes(ws)
    if sizes is None:
        return None
    return budget(ws.exp, section, name, ws.exp.stage(section, name, budgeted=False), sizes)


def eval_split(ws: Workspace) -> str:
    """What the "test" numbers of this experiment are measured on (rows and tables say it)."""
    return f"holdout {ws.exp.holdout:g} of train" if ws.exp.holdout else "test"


def input_spec(ws: Workspace, model_name: str) -> InputSpec:
    """The input of the teacher/student of ``model_name``: its size, its dataset's stats."""
    entry = ws.exp.entry(model_name)
    ds = dataset_of(ws, model_name)
    return InputSpec(size=(entry.input_size, entry.input_size), channels=3,
                     mean=tuple(ds.mean), std=tuple(ds.std))


def model_fingerprint(ws: Workspace, name: str) -> dict:
    """What the model of dataset ``name`` is and sees: architecture, input, data content."""
    e = ws.exp.entry(name)
    return {"arch": e.arch, "input_size": e.input_size, "hflip": e.hflip,
            "drop_rate": e.drop_rate, "drop_path_rate": e.drop_path_rate,
            "model_kwargs": e.model_kwargs, "data": dataset_of(ws, name).fingerprint()}


def view_config(ws: Workspace, data_name: str) -> ViewConfig:
    return ViewConfig(hflip=ws.exp.entry(data_name).hflip)


def pipeline_for(ws: Workspace, opts: RunOptions, data_name: str, split: str, spec: InputSpec,
                 order: np.ndarray, batch_size: int, auto_augment: str | None = None):
    ds = dataset_of(ws, data_name)
    return build_pipeline(ds.load(split), spec, order, batch_size, backend=pipeline_backend(opts),
                          seed=ws.exp.seed, view_cfg=view_config(ws, data_name),
                          device=opts.device, auto_augment=auto_augment)


def base_meta(kind: str, **kw) -> dict:
    import timm

    return {"kind": kind, "mlfd_version": __version__, "timm_version": timm.__version__, **kw}


def teacher_stem(ws: Workspace, name: str, which: str = "last"):
    return ws.teacher_dir(name) / which


def load_teacher(ws: Workspace, name: str, device: torch.device):
    """The trained teacher of dataset ``name`` (last epoch), frozen, in eval mode."""
    stem = teacher_stem(ws, name)
    if not stem.with_suffix(".safetensors").exists():
        raise MlfdError(f"teacher for {name!r} is not trained yet ({stem}.safetensors): "
                        f"run `mlfd teach --dataset {name}`")
    meta = load_meta(stem)
    if not meta.get("complete"):
        raise MlfdError(f"teacher {stem}.safetensors is incomplete (epoch {meta.get('epoch')}): "
                        f"run `mlfd teach --dataset {name}`")
    entry = ws.exp.entry(name)
    if meta.get("arch") != entry.arch:
        raise MlfdError(f"teacher checkpoint {stem}.safetensors is a {meta.get('arch')}, but the "
                        f"experiment says {entry.arch}: re-run `mlfd teach --dataset {name} --force`")
    model = build_level_backbone(entry, dataset_of(ws, name).num_classes)
    load_into(model.model, stem, f"{entry.arch} teacher of {name}")
    model.to(device).eval().requires_grad_(False)
    return model, meta


@torch.no_grad()
def evaluate_images(ws: Workspace, opts: RunOptions, data_name: str, spec: InputSpec,
                    logits_fn, batch_size: int = 256) -> dict:
    """Top-1/top-5 on the clean view of the test split (under torchrun: each rank its
    shard, counts summed, so every rank must call it)."""
    from ..engine.loop import autocast

    ds = dataset_of(ws, data_name)
    test = ds.load("test")
    acc = Accuracy()
    order = eval_order(len(test), 1, rank(), world())
    for b in pipeline_for(ws, opts, data_name, "test", spec, order, batch_size):
        with autocast(opts.device, precision(opts)):
            acc.update(logits_fn(b.images).float(), b.labels)
    return {**acc.reduce().result(), "pipeline": pipeline_backend(opts),
            "precision": precision(opts)}


def rank_batch(cfg) -> int:
    """This process's share of a global micro-batch: the global batch stays the
    experiment's whatever the number of torchrun processes (the CLI checks it divides)."""
    if cfg.micro_batch % world():
        raise MlfdError(f"a micro-batch of {cfg.micro_batch} does not split over {world()} "
                        "processes: use a batch size divisible by the process count")
    return cfg.micro_batch // world()


def trained_levels(ws: Workspace, kind: str, name: str | None = None) -> list[int]:
    """Levels with a result or a run in progress (``L2`` or ``.L2.partial``)."""
    base = ws.root / "joint" if kind == "joint" else ws.root / "students" / str(name)
    if not base.is_dir():
        return []
    found = {p.name.strip(".").split(".")[0] for p in base.iterdir() if p.is_dir()}
    return sorted(int(n[1:]) for n in found if n.startswith("L") and n[1:].isdigit())


def status_rows(art: Artifact, st: Status, **row) -> tuple[dict | None, list[dict]]:
    """(the row to measure, or None; rows listed without numbers) for one artifact."""
    listed = []
    partial = art.partial()
    if partial is not None:
        listed.append(dict(row, status="incomplete", epoch=partial.get("epoch"),
                           epochs=partial.get("epochs"), top1=None, top5=None, n=None,
                           reason=f"run in progress or interrupted: {art.staging}"))
    if st.state in ("missing",):
        return None, listed
    if st.state in ("corrupt", "incomplete"):
        listed.append(dict(row, status=st.state, epoch=st.meta.get("epoch"), top1=None,
                           top5=None, n=None, reason=st.reason))
        return None, listed
    measure = dict(row, status="complete" if st.ok else "stale", epoch=st.meta.get("epoch"),
                   epochs=st.meta.get("epochs"), reason=st.reason)
    return measure, listed


def joint_below_line(name: str, levels: int, joint: float, teacher: float, split: str) -> str:
    return (f"{name}: the joint teacher L{levels} ({100 * joint:.2f} %) is below {name}'s own "
            f"teacher ({100 * teacher:.2f} %) on the {split}: distilling from it is not "
            "expected to beat the teacher")


def weaker_joint(ws: Workspace, levels: int, names: list[str] | None = None) -> list[str]:
    """One line per dataset whose complete joint teacher L``levels`` scores below the
    dataset's own complete teacher, read from their recorded final metrics (measured on
    the split the experiment measures on: test, or the holdout)."""
    from ..engine.checkpoint import load_meta_safe

    joint = load_meta_safe(ws.joint_dir(levels) / "last") or {}
    if not joint.get("complete"):
        return []
    lines = []
    for n in names or ws.exp.names():
        teacher = load_meta_safe(ws.teacher_dir(n) / "last") or {}
        t, j = (teacher.get("metrics") or {}).get("top1"), (joint.get("metrics") or {}).get(
            f"{n}/top1")
        if teacher.get("complete") and t is not None and j is not None and j < t:
            lines.append(joint_below_line(n, levels, j, t, eval_split(ws)))
    return lines
