"""Stage `fuse`: train the joint teacher on the cached teacher embeddings of all datasets.

Batches mix samples of every dataset (proportionally to size); each sample's CE uses
its own dataset's head. No backbone runs: the teachers' L_K embeddings come from
the cache, one randomly chosen cached view per sample and epoch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sampling import shard_indices, train_order
from ..engine.artifact import Artifact, Status, TrainRun
from ..engine.checkpoint import load_into, load_meta
from ..engine.distributed import rank, world
from ..engine.loop import fit, seed_everything
from ..engine.metrics import Accuracy
from ..engine.progress import log
from ..errors import MlfdError
from ..fastpaths import used
from ..models import JointTeacher, level_shapes
from ..models.backbone import apply_init
from ..storage.fingerprint import flatten
from ..workspace import Workspace
from .cache import content_digest, embedding_fingerprint, load_teacher_inputs
from .common import RunOptions, base_meta, dataset_of, drop_unset, load_teacher


def joint_fingerprint(ws: Workspace, levels: int) -> dict:
    """The joint teacher depends on its config, the seed and the cached teacher embeddings."""
    inputs = {f"{n}/{s}": content_digest(embedding_fingerprint(ws, levels, n, s))
              for n in ws.exp.names() for s in ("train", "test")}
    return drop_unset(flatten({"fuse": ws.exp.fuse, "seed": ws.exp.seed, "levels": levels,
                               "embeddings": inputs}))


def joint_status(ws: Workspace, levels: int) -> Status:
    return Artifact(ws.joint_dir(levels)).status(joint_fingerprint(ws, levels))


def fuse(ws: Workspace, opts: RunOptions, levels: int) -> dict:
    cfg, names = ws.exp.fuse, ws.exp.names()
    seed_everything(ws.exp.seed)
    train = [load_teacher_inputs(ws, levels, n, "train") for n in names]
    test = [load_teacher_inputs(ws, levels, n, "test") for n in names]
    shapes = []
    for e in ws.exp.datasets:
        t, _ = load_teacher(ws, e.name, torch.device("cpu"))
        shapes.append(level_shapes(t, e.input_size, levels))
    joint = build_joint(ws, shapes, levels).to(opts.device)
    apply_init(joint, cfg.init)
    sizes = [len(lab) for _, lab in train]
    V = train[0][0][0].shape[1]
    total = sum(sizes)
    steps = (total + cfg.micro_batch - 1) // cfg.micro_batch
    out = ws.joint_dir(levels)
    meta = base_meta("joint", levels=levels, datasets=names, teacher_shapes=shapes,
                     num_classes=[dataset_of(ws, n).num_classes for n in names],
                     train=vars(cfg).copy(),
                     seed=ws.exp.seed)

    def batches(epoch):
        # Per dataset: a shuffled pass with one cached view per sample; then interleave.
        parts = []
        for d, n in enumerate(sizes):
            o = train_order(n, epoch, ws.exp.seed + d, V)
            parts.append(np.column_stack([np.full(n, d), o]))
        allrows = np.concatenate(parts)
        allrows = allrows[np.random.default_rng([ws.exp.seed, epoch, 7]).permutation(total)]
        for s in range(0, total, cfg.micro_batch):
            rows = allrows[s:s + cfg.micro_batch][rank()::world()]  # this rank's share
            if len(rows):  # none: the last batch has fewer rows than there are ranks
                yield rows

    def step(rows):
        # One forward over the whole mixed batch, so BatchNorm sees the same mixture in
        # training as when the targets are cached; then each sample's CE on its own head.
        parts = [rows[rows[:, 0] == d] for d in range(len(names))]
        x = [torch.cat([train[d][0][t][torch.as_tensor(p[:, 1]), torch.as_tensor(p[:, 2])]
                        for d, p in enumerate(parts)]).to(opts.device).float()
             for t in range(len(names))]
        l1 = joint(x)[0]
        loss, start = torch.zeros((), device=opts.device), 0
        for d, p in enumerate(parts):
            if len(p):
                y = torch.from_numpy(train[d][1][p[:, 1]]).to(opts.device)
                logits = joint.logits(l1[start:start + len(p)], d).float()
                loss = loss + F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing,
                                              reduction="sum") / len(rows)
            start += len(p)
        return loss, {}, len(rows)

    def evaluate():
        row, top1 = {}, []
        for d, n in enumerate(names):
            feats, labels = test[d]
            acc = Accuracy()
            shard = shard_indices(len(labels), rank(), world())  # summed by acc.reduce()
            for s in range(0, len(shard), 1024):
                idx = shard[s:s + 1024]
                emb = joint_forward_cached(joint, feats, idx, np.zeros_like(idx), opts.device)
                acc.update(joint.logits(emb[0], d).float(),
                           torch.from_numpy(labels[idx]).to(opts.device))
            r = acc.reduce().result()
            row[f"{n}/top1"], row[f"{n}/top5"] = r["top1"], r["top5"]
            top1.append(r["top1"])
        row["top1"] = float(np.mean(top1))
        return row

    run = TrainRun(out, meta, joint_fingerprint(ws, levels), joint.state_dict,
                   restart=opts.restart, title=f"fuse L{levels}")
    log(f"[fuse] joint teacher L{levels} over {len(names)} teachers, {total} samples x {V} views")
    res = fit(title=f"fuse L{levels}", model=joint, cfg=cfg, device=opts.device,
              steps_per_epoch=steps, batches=batches, step=step, evaluate=evaluate, run=run,
              used=used(opts, pipeline=False))  # trains on cached embeddings: no pipeline
    return res.last


def load_joint(ws: Workspace, levels: int, device: torch.device) -> tuple[JointTeacher, dict]:
    stem = ws.joint_dir(levels) / "last"
    if not stem.with_suffix(".safetensors").exists():
        raise MlfdError(f"no joint teacher for L{levels} ({stem}.safetensors): run `mlfd fuse`")
    meta = load_meta(stem)
    if not meta.get("complete"):
        raise MlfdError(f"joint teacher {stem}.safetensors is incomplete: run `mlfd fuse`")
    joint = build_joint(ws, meta["teacher_shapes"], levels)
    load_into(joint, stem, f"joint teacher L{levels}")
    return joint.to(device).eval().requires_grad_(False), meta


def build_joint(ws: Workspace, teacher_shapes, levels: int) -> JointTeacher:
    cfg = ws.exp.fuse
    return JointTeacher([[tuple(s) for s in t] for t in teacher_shapes],
                        [dataset_of(ws, e.name).num_classes for e in ws.exp.datasets], levels,
                        cfg.width, cfg.embed_dim, cfg.dropout)


def joint_forward_cached(joint: JointTeacher, feats: list[torch.Tensor], rows: np.ndarray,
                         views: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    r, v = torch.as_tensor(rows), torch.as_tensor(views)
    return joint([f[r, v].to(device).float() for f in feats])
