"""The paper's multi-dataset baselines (section 4.2), trained by `mlfd teach --baseline`.

* multi-head: a shared backbone with one head per dataset; every step forwards one batch
  of each dataset and averages their CE losses.
* joint-head: one head over the union of all classes (labels offset per dataset);
  every step trains on a batch mixing all datasets, and prediction is over the union.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.pipelines import InputSpec
from ..data.sampling import train_order
from ..engine.artifact import TrainRun
from ..engine.distributed import rank, world
from ..engine.loop import fit, seed_everything
from ..engine.progress import log
from ..errors import MlfdError
from ..fastpaths import used
from ..models import create_backbone
from ..models.backbone import apply_init
from ..storage.fingerprint import flatten
from ..workspace import Workspace
from .common import (
    RunOptions,
    base_meta,
    dataset_of,
    drop_unset,
    evaluate_images,
    pipeline_for,
    rank_batch,
)

KINDS = ("multi-head", "joint-head")


class MultiDatasetModel(nn.Module):
    """A timm backbone without classifier, plus heads: one per dataset or one over all."""

    def __init__(self, arch: str, num_classes: list[int], kind: str, **kw):
        super().__init__()
        if kind not in KINDS:
            raise MlfdError(f"unknown baseline {kind!r}: choose {', '.join(KINDS)}")
        self.kind, self.num_classes = kind, list(num_classes)
        self.backbone = create_backbone(arch, 0, **kw)
        dim = self.backbone.num_features
        sizes = self.num_classes if kind == "multi-head" else [sum(self.num_classes)]
        self.heads = nn.ModuleList(nn.Linear(dim, c) for c in sizes)
        self.offsets = list(itertools.accumulate([0] + self.num_classes[:-1]))

    def forward(self, x: torch.Tensor, dataset: int) -> torch.Tensor:
        """Logits: the dataset's own head (multi-head) or the union head (joint-head)."""
        feats = self.backbone(x)
        return self.heads[dataset if self.kind == "multi-head" else 0](feats)

    def target(self, labels: torch.Tensor, dataset: int) -> torch.Tensor:
        return labels if self.kind == "multi-head" else labels + self.offsets[dataset]

    def dataset_logits(self, x: torch.Tensor, dataset: int) -> torch.Tensor:
        """Logits whose column c is the dataset's class c. For joint-head the columns are
        rotated, not sliced: every other dataset's classes still compete for the argmax."""
        logits = self(x, dataset)
        return logits if self.kind == "multi-head" else logits.roll(-self.offsets[dataset], 1)


def baseline_dir(ws: Workspace, kind: str, arch: str):
    return ws.root / "baselines" / f"{kind}-{arch}"


def baseline_entry(exp, arch: str):
    """The first dataset entry with this arch (else the first entry): a baseline trains
    with the model options and teach values its architecture has as a teacher."""
    return next((d for d in exp.datasets if d.arch == arch), exp.datasets[0])


def baseline_config(exp, arch: str):
    """The teach values of the architecture's entry, but the section's epochs: a baseline's
    epoch is a pass over the largest dataset, so an epoch count set for one dataset's own
    size (e.g. more epochs for a small one) does not carry over."""
    cfg = exp.stage("teach", baseline_entry(exp, arch).name, budgeted=False)
    return dataclasses.replace(cfg, epochs=exp.teach.epochs)


def baseline_drops(exp, arch: str) -> dict:
    e = baseline_entry(exp, arch)
    return {"drop_rate": e.drop_rate, "drop_path_rate": e.drop_path_rate}


def baseline_model_kwargs(exp, arch: str) -> dict:
    e = baseline_entry(exp, arch)
    return dict(e.model_kwargs) if e.arch == arch else {}


def baseline_spec(exp, kind: str, arch: str, size: int) -> dict:
    """What a baseline's training depends on besides its data and seed: the experiment's
    other values (e.g. a dataset's own teach epochs, the students) leave it unchanged."""
    return {"baseline": kind, "arch": arch, "input_size": size,
            "hflip": {e.name: e.hflip for e in exp.datasets},
            "teach": baseline_config(exp, arch), "model_kwargs": baseline_model_kwargs(exp, arch),
            **baseline_drops(exp, arch)}


def baseline_fingerprint(ws: Workspace, kind: str, arch: str, size: int) -> dict:
    data = {n: dataset_of(ws, n).fingerprint() for n in ws.exp.names()}
    return drop_unset(flatten({**baseline_spec(ws.exp, kind, arch, size), "data": data,
                               "seed": ws.exp.seed}))


def train_baseline(ws: Workspace, opts: RunOptions, kind: str, arch: str | None = None,
                   input_size: int | None = None) -> dict:
    exp = ws.exp
    arch = arch or exp.datasets[0].arch
    cfg = baseline_config(exp, arch)
    size = input_size or exp.datasets[0].input_size
    names = exp.names()
    data = [dataset_of(ws, n) for n in names]
    seed_everything(exp.seed)
    drops = baseline_drops(exp, arch)
    kw = baseline_model_kwargs(exp, arch)
    model = MultiDatasetModel(arch, [d.num_classes for d in data], kind, **drops, **kw)
    model.to(opts.device)
    apply_init(model, cfg.init)
    specs = [InputSpec((size, size), 3, tuple(d.mean), tuple(d.std)) for d in data]
    sizes = [len(d.load("train")) for d in data]
    # Per step one batch of every dataset; an epoch ends when the largest is through.
    steps = max((n + cfg.micro_batch - 1) // cfg.micro_batch for n in sizes)
    out = baseline_dir(ws, kind, arch)

    def batches(epoch):
        iters = []
        for i, (name, n) in enumerate(zip(names, sizes)):
            reps = -(-steps * cfg.micro_batch // n)  # smaller datasets cycle
            order = torch.cat([torch.from_numpy(train_order(n, epoch * 97 + r, exp.seed, "fresh"))
                               for r in range(reps)]).numpy()[: steps * cfg.micro_batch]
            # this rank's share of every global batch (steps * micro_batch splits evenly)
            order = order[rank()::world()]
            iters.append(iter(pipeline_for(ws, opts, name, "train", specs[i], order,
                                           rank_batch(cfg), cfg.auto_augment)))
        for _ in range(steps):
            yield [next(it) for it in iters]

    def step(group):
        if kind == "multi-head":
            losses = [F.cross_entropy(model(b.images, d).float(), b.labels,
                                      label_smoothing=cfg.label_smoothing)
                      for d, b in enumerate(group)]
            return torch.stack(losses).mean(), {}, sum(len(b) for b in group)
        x = torch.cat([b.images for b in group])
        y = torch.cat([model.target(b.labels, d) for d, b in enumerate(group)])
        loss = F.cross_entropy(model(x, 0).float(), y, label_smoothing=cfg.label_smoothing)
        return loss, {}, len(y)

    def evaluate():
        row = {}
        for d, name in enumerate(names):
            r = evaluate_images(ws, opts, name, specs[d], lambda x, d=d: model.dataset_logits(x, d))
            row[f"{name}/top1"], row[f"{name}/top5"] = r["top1"], r["top5"]
        row["top1"] = sum(row[f"{n}/top1"] for n in names) / len(names)
        return row

    meta = base_meta("baseline", baseline=kind, arch=arch, input_size=size, datasets=names,
                     num_classes=[d.num_classes for d in data], train=vars(cfg).copy(),
                     seed=exp.seed, model_kwargs=kw, **drops)

    run = TrainRun(out, meta, baseline_fingerprint(ws, kind, arch, size), model.state_dict,
                   restart=opts.restart, title=f"{kind} {arch}")
    log(f"[teach] {kind} baseline: {arch} over {len(names)} datasets, {cfg.epochs} epochs")
    res = fit(title=f"{kind} {arch}", model=model, cfg=cfg, device=opts.device,
              steps_per_epoch=steps, batches=batches, step=step, evaluate=evaluate, run=run,
              used=used(opts))
    return res.last


def baseline_rows(ws: Workspace, opts: RunOptions) -> list[dict]:
    """Test accuracy of every trained baseline of this experiment, per dataset."""
    from ..engine.artifact import Artifact
    from ..engine.checkpoint import load_into, load_meta_safe
    from .common import status_rows

    rows = []
    base = ws.root / "baselines"
    found = sorted({p.name.strip(".").removesuffix(".partial").removesuffix(".old")
                    for p in base.iterdir() if p.is_dir()}) if base.is_dir() else []
    for dirname in found:
        art = Artifact(base / dirname)
        meta = load_meta_safe(art.final / "last") or art.partial() or {}
        if meta.get("datasets") != ws.exp.names():
            log(f"[eval] skipping baseline {dirname}: trained on other datasets")
            continue
        st = art.status(baseline_fingerprint(ws, meta["baseline"], meta["arch"],
                                             meta["input_size"]))
        row, listed = status_rows(art, st, model=meta["baseline"], arch=meta["arch"],
                                  levels=None)
        rows += [dict(r, dataset=n) for r in listed for n in meta["datasets"]]
        if row is None:
            continue
        model = MultiDatasetModel(meta["arch"], meta["num_classes"], meta["baseline"],
                                  **meta.get("model_kwargs", {}))
        load_into(model, art.final / "last", f"{meta['baseline']} baseline ({meta['arch']})")
        model.to(opts.device).eval()
        size = meta["input_size"]
        for d, name in enumerate(meta["datasets"]):
            ds = dataset_of(ws, name)
            spec = InputSpec((size, size), 3, tuple(ds.mean), tuple(ds.std))
            r = evaluate_images(ws, opts, name, spec,
                                lambda x, m=model, d=d: m.dataset_logits(x, d))
            rows.append(dict(row, dataset=name, **r))
    return rows
