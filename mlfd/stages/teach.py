"""Stage `teach`: one teacher per dataset, trained from scratch with cross-entropy, or
imported from a checkpoint the user brings (``DatasetEntry.teacher``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.sampling import train_order
from ..engine.artifact import Artifact, Status, TrainRun
from ..engine.checkpoint import file_sha256, save_checkpoint
from ..engine.distributed import barrier, is_main, rank, world
from ..engine.loop import fit, seed_everything
from ..engine.progress import log
from ..errors import MlfdError
from ..fastpaths import used
from ..models import build_level_backbone
from ..models.backbone import apply_init
from ..storage.fingerprint import flatten
from ..workspace import Workspace
from .common import (
    RunOptions,
    base_meta,
    dataset_of,
    drop_unset,
    evaluate_images,
    input_spec,
    model_fingerprint,
    pipeline_for,
    rank_batch,
)


def teacher_fingerprint(ws: Workspace, name: str) -> dict:
    """Everything a teacher's weights depend on: data, model, training config, seed; for an
    imported teacher, the model and the checkpoint file's sha256."""
    entry = ws.exp.entry(name)
    if entry.teacher:
        return flatten({"model": model_fingerprint(ws, name),
                        "import": {"sha256": _import_sha(entry.teacher)}})
    return drop_unset(flatten({"model": model_fingerprint(ws, name),
                               "teach": ws.exp.stage("teach", name), "seed": ws.exp.seed}))


_SHA: dict[tuple[str, float, int], str] = {}


def _import_sha(path: str) -> str | None:
    """sha256 of an imported checkpoint (memoised by mtime and size: plans ask often)."""
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    key = (str(p), st.st_mtime, st.st_size)
    if key not in _SHA:
        _SHA[key] = file_sha256(p)
    return _SHA[key]


def read_state_dict(path: str) -> dict:
    """A state dict from .safetensors or a torch file (also nested under 'state_dict',
    'model' or 'state_dict_ema', as training scripts save them); one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise MlfdError(f"teacher checkpoint {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors: all mean "not readable"
        raise MlfdError(f"teacher checkpoint {p} is not readable: "
                        f"{str(e).splitlines()[0]}") from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise MlfdError(f"teacher checkpoint {p} holds no state dict of tensors")
    # DataParallel / DDP checkpoints prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def import_teacher(ws: Workspace, opts: RunOptions, name: str) -> dict:
    """Load the dataset's imported teacher into its architecture, evaluate it on the test
    split and store it as the complete teacher of ``name``; returns its metrics."""
    entry = ws.exp.entry(name)
    ds = dataset_of(ws, name)
    model = build_level_backbone(entry, ds.num_classes)
    state = read_state_dict(entry.teacher)
    try:
        model.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MlfdError(f"teacher checkpoint {entry.teacher} does not fit {entry.arch} with "
                        f"{ds.num_classes} classes: {str(e).splitlines()[0]}") from None
    model.to(opts.device).eval()
    row = evaluate_images(ws, opts, name, input_spec(ws, name), model.model)
    log(f"[teach] {name}: imported {entry.teacher}: test top1 {row['top1']:.4f}")
    fingerprint = teacher_fingerprint(ws, name)
    meta = base_meta("teacher", dataset=name, source=entry.source,
                     dataset_fingerprint=ds.fingerprint(), arch=entry.arch,
                     num_classes=ds.num_classes, classes=ds.classes, input_size=entry.input_size,
                     model_kwargs=entry.model_kwargs, mean=list(ds.mean), std=list(ds.std),
                     imported=entry.teacher, seed=ws.exp.seed, fingerprint=fingerprint,
                     epoch=0, epochs=0, metrics=row, complete=True)
    if is_main():  # under torchrun: every rank evaluated its shard, rank 0 writes
        art = Artifact(ws.teacher_dir(name))
        art.recover()
        if art.staging.exists():
            shutil.rmtree(art.staging)
        art.staging.mkdir(parents=True)
        save_checkpoint(art.staging / "last", model.model.state_dict(), meta)
        art.promote()
    barrier()
    return row


def teacher_status(ws: Workspace, name: str) -> Status:
    return Artifact(ws.teacher_dir(name)).status(teacher_fingerprint(ws, name))


def teach(ws: Workspace, opts: RunOptions, name: str) -> dict:
    """Train (or import) the teacher of dataset ``name``; returns its last-epoch metrics."""
    entry, cfg = ws.exp.entry(name), ws.exp.stage("teach", name)
    if entry.teacher:
        return import_teacher(ws, opts, name)
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

    def batches(epoch):  # this rank's share of every global batch
        order = train_order(len(train), epoch, ws.exp.seed, "fresh", rank(), world())
        return pipeline_for(ws, opts, name, "train", spec, order, rank_batch(cfg),
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
              evaluate=lambda: evaluate_images(ws, opts, name, spec, model.model), run=run,
              used=used(opts))
    return res.last
