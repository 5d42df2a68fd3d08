"""Stage `teach`: one teacher per dataset, trained from scratch with cross-entropy."""

from __future__ import annotations

import torch.nn.functional as F

from ..data.sampling import train_order
from ..engine.artifact import Artifact, Status, TrainRun
from ..engine.fingerprint import flatten
from ..engine.loop import fit, seed_everything
from ..engine.progress import log
from ..models import build_level_backbone
from ..models.backbone import apply_init
from ..workspace import Workspace
from .common import (
    RunOptions,
    base_meta,
    dataset_of,
    evaluate_images,
    input_spec,
    model_fingerprint,
    pipeline_for,
)


def teacher_fingerprint(ws: Workspace, name: str) -> dict:
    """Everything a teacher's weights depend on: data, model, training config, seed."""
    return flatten({"model": model_fingerprint(ws, name), "teach": ws.exp.stage("teach", name),
                    "seed": ws.exp.seed})


def teacher_status(ws: Workspace, name: str) -> Status:
    return Artifact(ws.teacher_dir(name)).status(teacher_fingerprint(ws, name))


def teach(ws: Workspace, opts: RunOptions, name: str) -> dict:
    """Train the teacher of dataset ``name``; returns its last-epoch metrics."""
    entry, cfg = ws.exp.entry(name), ws.exp.stage("teach", name)
    ds = dataset_of(ws, name)
    train = ds.load("train")
    seed_everything(ws.exp.seed)
    model = build_level_backbone(entry, ds.num_classes).to(opts.device)
    apply_init(model, cfg.init)
    spec = input_spec(ws, name)
    steps = (len(train) + cfg.micro_batch - 1) // cfg.micro_batch
    meta = base_meta("teacher", dataset=name, source=entry.source,
                     dataset_fingerprint=ds.fingerprint(), arch=entry.arch,
                     num_classes=ds.num_classes, classes=ds.classes, input_size=entry.input_size,
                     model_kwargs=entry.model_kwargs, drop_rate=entry.drop_rate,
                     drop_path_rate=entry.drop_path_rate, mean=list(ds.mean), std=list(ds.std),
                     train=vars(cfg).copy(), seed=ws.exp.seed)

    def batches(epoch):
        order = train_order(len(train), epoch, ws.exp.seed, "fresh")
        return pipeline_for(ws, opts, name, "train", spec, order, cfg.micro_batch,
                            cfg.auto_augment)

    def step(b):
        logits = model.model(b.images)
        loss = F.cross_entropy(logits.float(), b.labels, label_smoothing=cfg.label_smoothing)
        return loss, {}, len(b)

    run = TrainRun(ws.teacher_dir(name), meta, teacher_fingerprint(ws, name),
                   model.model.state_dict, restart=opts.restart, title=f"teach {name}")
    log(f"[teach] {name}: {entry.arch} on {len(train)} images, {cfg.epochs} epochs, "
        f"{entry.input_size}px, device {opts.device}")
    res = fit(title=f"teach {name}", model=model, cfg=cfg, device=opts.device,
              steps_per_epoch=steps, batches=batches, step=step,
              evaluate=lambda: evaluate_images(ws, opts, name, spec, model.model), run=run)
    return res.last
