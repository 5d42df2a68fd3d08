"""Stage `distill`: one student per dataset, multi-level KD against cached joint targets.

The student has its dataset's teacher architecture. Each step draws, per sample, one
of the V cached views; the pipeline renders exactly that view, so the joint
teacher's targets match the pixels the student sees.
"""

from __future__ import annotations

import torch

from ..data.sampling import train_order
from ..engine.artifact import Artifact, Status, TrainRun
from ..engine.fingerprint import digest, flatten
from ..engine.loop import fit, seed_everything
from ..engine.progress import log
from ..errors import MlfdError
from ..export import write_student_config
from ..losses import KDLossConfig, kd_loss, resolve_backend
from ..models import Student, build_level_backbone, level_shapes
from ..models.backbone import apply_init
from ..workspace import Workspace
from .cache import target_group, view_augment
from .common import (
    RunOptions,
    base_meta,
    dataset_of,
    evaluate_images,
    input_spec,
    model_fingerprint,
    pipeline_for,
)


def loss_config(ws: Workspace, levels: int, name: str | None = None) -> KDLossConfig:
    cfg = ws.exp.stage("distill", name)
    weights = list(cfg.level_weights)
    if len(weights) < levels:
        # Missing weights repeat the last one given (0.2 by default, as in the paper).
        weights += [weights[-1] if weights else 0.2] * (levels - len(weights))
    return KDLossConfig(ce_weight=cfg.ce_weight, soft_weight=cfg.soft_weight,
                        temperature=cfg.temperature, level_weights=tuple(weights[:levels]),
                        label_smoothing=cfg.label_smoothing)


def student_fingerprint(ws: Workspace, name: str, levels: int) -> dict:
    """A student depends on its model and data, the distill config (the loss backend aside:
    both backends compute the same loss), the seed and the joint teacher's targets."""
    cfg = {k: v for k, v in vars(ws.exp.stage("distill", name)).items() if k != "loss_backend"}
    return flatten({"model": model_fingerprint(ws, name), "distill": cfg, "seed": ws.exp.seed,
                    "levels": levels, "targets": digest(target_group(ws, levels, name).fingerprint)})


def student_status(ws: Workspace, name: str, levels: int) -> Status:
    return Artifact(ws.student_dir(name, levels)).status(student_fingerprint(ws, name, levels))


def distill(ws: Workspace, opts: RunOptions, name: str, levels: int) -> dict:
    entry, cfg = ws.exp.entry(name), ws.exp.stage("distill", name)
    ds = dataset_of(ws, name)
    group = target_group(ws, levels, name)
    targets = group.load()
    N, V = targets["logits"].shape[:2]
    if len(ds.load("train")) != N:
        raise MlfdError(f"target cache {group.path} has {N} samples, dataset has "
                        f"{len(ds.load('train'))}: re-run `mlfd cache --force`")
    seed_everything(ws.exp.seed)
    backbone = build_level_backbone(entry, ds.num_classes)
    s_shapes = level_shapes(backbone, entry.input_size, levels)
    t_shapes = [targets[f"L{k + 1}"].shape[2:] for k in range(levels)]
    student = Student(backbone, s_shapes, t_shapes).to(opts.device)
    apply_init(student, cfg.init)
    backend = resolve_backend(opts.loss_backend or cfg.loss_backend, opts.device)
    kd_cfg = loss_config(ws, levels, name)
    # Targets stay resident (fp16) on the training device; rows are gathered per batch.
    dev_t = {k: torch.from_numpy(v).to(opts.device) for k, v in targets.items() if k != "labels"}
    spec = input_spec(ws, name)
    out = ws.student_dir(name, levels)
    steps = (N + cfg.micro_batch - 1) // cfg.micro_batch
    meta = base_meta("student", dataset=name, source=entry.source, arch=entry.arch,
                     num_classes=ds.num_classes, classes=ds.classes, levels=levels,
                     input_size=entry.input_size, model_kwargs=entry.model_kwargs,
                     mean=list(ds.mean), std=list(ds.std), targets_digest=digest(group.fingerprint), loss=vars(kd_cfg),
                     loss_backend=backend, train=vars(cfg).copy(), seed=ws.exp.seed)

    def batches(epoch):
        order = train_order(N, epoch, ws.exp.seed, V)
        # the views the targets were cached for, AutoAugment included (replayable)
        return pipeline_for(ws, opts, name, "train", spec, order, cfg.micro_batch,
                            view_augment(ws, name))

    def step(b):
        idx, view = b.index.to(opts.device), b.view.to(opts.device)
        logits, embeds = student(b.images)
        t_logits = dev_t["logits"][idx, view]
        t_embeds = [dev_t[f"L{k + 1}"][idx, view] for k in range(levels)]
        loss, terms = kd_loss(logits.float(), t_logits.float(), b.labels,
                              [e.float() for e in embeds], [t.float() for t in t_embeds],
                              kd_cfg, backend=backend)
        return loss, terms, len(b)

    # Exported students are plain timm models; adaptors are kept aside for inspection.
    run = TrainRun(out, meta, student_fingerprint(ws, name, levels),
                   student.backbone.model.state_dict,
                   extras={"adaptors": student.adaptors.state_dict}, restart=opts.restart,
                   title=f"distill {name} L{levels}")

    log(f"[distill] {name}: {entry.arch} student, levels L1..L{levels}, loss backend {backend}, "
        f"{N} images x {V} cached views")
    res = fit(title=f"distill {name} L{levels}", model=student, cfg=cfg, device=opts.device,
              steps_per_epoch=steps, batches=batches, step=step,
              evaluate=lambda: evaluate_images(ws, opts, name, spec, student.backbone.model),
              run=run)
    write_student_config(out, student.backbone.model)
    return res.last
