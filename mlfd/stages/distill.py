"""Stage `distill`: one student per dataset, multi-level KD against cached joint targets.

The student has its dataset's teacher architecture. Each step draws, per sample, one
of the V cached views; the pipeline renders exactly that view, so the joint
teacher's targets match the pixels the student sees.

Targets that fit the run's cache memory (``--cache-memory``, default half the free
memory, shared by the run's processes on a machine) are held whole on the training
device and gathered per batch. Bigger ones are streamed: the epoch visits
chunk-shuffled windows of the cache (``chunk_order``), each chunk in one view drawn per
(chunk, epoch) so only that view is read; a background thread decodes the next window
while the student trains on the current one (and the next epoch's first while this
epoch ends), and the image pipeline renders the same order. That order changes which
samples meet in a batch and which views they see, so a streamed student's fingerprint
records it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from ..cache import DECODE_ERRORS
from ..cache.quant import QUANTISED, TOPK_INDEX, is_scale, topk_unpack
from ..cache.stream import EpochStream, default_budget, format_size, gather_rows
from ..data.sampling import chunk_order, train_order
from ..engine.artifact import Artifact, Status, TrainRun
from ..engine.checkpoint import load_meta, load_meta_safe
from ..engine.distributed import is_main, local_world, rank, world
from ..engine.loop import fit, seed_everything
from ..engine.progress import log
from ..errors import MlfdError
from ..fastpaths import loss_backend, used
from ..losses import KDLossConfig, kd_loss
from ..models import Student, build_level_backbone, level_shapes
from ..models.backbone import apply_init
from ..models.timm_config import CONFIG_FILE, write_config
from ..storage.fingerprint import flatten
from ..workspace import Workspace
from .cache import content_digest, view_augment
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
from .targets import target_group


def loss_config(ws: Workspace, levels: int, name: str | None = None) -> KDLossConfig:
    cfg = ws.exp.stage("distill", name)
    weights = list(cfg.level_weights)
    if len(weights) < levels:
        # Missing weights repeat the last one given (0.2 by default, as in the paper).
        weights += [weights[-1] if weights else 0.2] * (levels - len(weights))
    return KDLossConfig(ce_weight=cfg.ce_weight, soft_weight=cfg.soft_weight,
                        temperature=cfg.temperature, level_weights=tuple(weights[:levels]),
                        label_smoothing=cfg.label_smoothing)


def target_names(group, levels: int) -> list[str]:
    """The target arrays a student at L1..L``levels`` reads from its dataset's group."""
    names = ["logits", *(f"L{k + 1}" for k in range(levels))]
    if TOPK_INDEX in group.shapes():  # top-K logits: expanded back per batch (student_loss)
        names.append(TOPK_INDEX)
    return names


def on_device(group, targets: dict, device) -> dict:
    """Targets held whole: resident (fp16) on the training device, rows gathered per batch."""
    return {k: t.to(device) for k, t in group.tensors(targets).items() if k != "labels"}


def student_loss(logits, embeds, t: dict, labels, kd_cfg: KDLossConfig, backend: str):
    """The KD loss of a batch against its targets ``t`` (logits, L1..LK, maybe top-K)."""
    t_logits = t["logits"]
    if TOPK_INDEX in t:  # the row minimum for every class outside the top K
        t_logits = topk_unpack(t_logits.float(), t[TOPK_INDEX], logits.shape[1])
    t_embeds = [t[f"L{k + 1}"] for k in range(len(embeds))]
    return kd_loss(logits.float(), t_logits.float(), labels, [e.float() for e in embeds],
                   [x.float() for x in t_embeds], kd_cfg, backend=backend)


WINDOW_BYTES = 1 << 30  # a streamed window's decoded size, at most
PREFETCH = 1  # windows decoded ahead: (PREFETCH + 1) windows alive at a time


@dataclass(frozen=True)
class TargetFeed:
    """How targets reach the student: whole in memory, or streamed in windows of chunks."""

    streaming: bool
    nbytes: int  # decoded target bytes, labels aside
    budget: int
    chunk_rows: int = 0  # samples per chunk of the order (the streamed arrays' largest)
    window: int = 0  # chunks per window
    resident: tuple[str, ...] = ()  # small arrays held whole even when streaming

    def fingerprint(self) -> dict:
        """What the student's fingerprint gains: nothing in memory (results as before)."""
        if not self.streaming:
            return {}
        # views drawn per (chunk, epoch), not per sample: another order of (sample, view)
        return flatten({"order": {"kind": "chunk-shuffled", "window": self.window,
                                  "chunk_rows": self.chunk_rows, "views": "per-chunk"}})


def cache_budget(opts: RunOptions, processes: int | None = None) -> int:
    """The run's target-cache memory: --cache-memory, else half the free memory shared by
    the run's ``processes`` on this machine (default: torchrun's local world size), each
    holding its own copy of the targets (where free memory cannot be read: no limit,
    targets stay in memory as they always did)."""
    if opts.cache_memory is not None:
        return opts.cache_memory
    budget = default_budget(opts.device)
    return sys.maxsize if budget is None else budget // (processes or local_world())


def _itemsize(dtype: str) -> int:
    # int8 targets are read as float32 (their scales multiplied in)
    return 2 if dtype == "bfloat16" else 4 if dtype == QUANTISED else np.dtype(dtype).itemsize


def feed_of(zgroup, budget: int) -> TargetFeed:
    """In memory if the decoded targets fit ``budget``; else streamed. Reads metadata only.

    Streaming: the smallest arrays stay whole in memory while they fit a quarter of the
    budget (logits beside 7x7 maps: their chunks hold hundreds of samples, which every
    window would decode again). The rest is read in windows of whole chunks of the
    largest streamed chunk rows, each window at most WINDOW_BYTES and (PREFETCH + 1) of
    them within what the resident arrays leave of the budget. A window holds one view of
    its chunks (chunk_order draws views per chunk): 1/V of their samples' bytes."""
    spec = {k: v for k, v in dict(zgroup.attrs)["arrays"].items()
            if k != "labels" and not is_scale(k)}  # scales: read with their values
    n = int(next(iter(spec.values()))[0][0])
    row = {k: int(np.prod(shape[1:], dtype=np.int64)) * _itemsize(dtype)
           for k, (shape, dtype) in spec.items()}
    total = n * sum(row.values())
    if total <= budget:
        return TargetFeed(False, total, budget)
    resident, room = [], budget // 4
    for k in sorted(spec, key=row.get):
        if n * row[k] > room:
            break
        resident.append(k)
        room -= n * row[k]
    streamed = [k for k in spec if k not in resident]
    # zarr's chunks are the inner chunks of a sharded array: the finest unit it can decode
    rows = max(int(zgroup[k].chunks[0]) for k in streamed)
    left = budget - n * sum(row[k] for k in resident)
    views = max(1, int(next(iter(spec.values()))[0][1]))
    sample = -(-sum(row[k] for k in streamed) // views)  # one view of a sample, decoded
    fit = max(1, min(WINDOW_BYTES, left // (PREFETCH + 1)) // max(rows * sample, 1))
    # a power of two: a default budget drifting with free memory rarely moves the window,
    # hence the fingerprint
    window = 1 << (fit.bit_length() - 1)
    # then evened out over the epoch's windows: no sliver of a last window, behind which
    # the next epoch's first window could not be read ahead
    n_chunks = -(-n // rows)
    window = -(-n_chunks // -(-n_chunks // window))
    return TargetFeed(True, total, budget, rows, window, tuple(resident))


def target_feed(ws: Workspace, name: str, levels: int, budget: int) -> TargetFeed | None:
    """feed_of the target cache of ``name`` (None: no readable cache to decide from)."""
    import zarr

    group = target_group(ws, levels, name)
    try:
        if not group.exists():
            return None
        # metadata only: no integrity read (status stays cheap; training checks on open)
        store = group._dir(group.path).zarr_store(read_only=True)
        return feed_of(zarr.open_group(store=store, mode="r"), budget)
    except (OSError, StopIteration, *DECODE_ERRORS):
        return None


def _trained_order(ws: Workspace, name: str, levels: int) -> dict:
    art = Artifact(ws.student_dir(name, levels))
    stored = (load_meta_safe(art.readable() / "last") or {}).get("fingerprint")
    return {k: v for k, v in (stored or {}).items() if k.startswith("order.")}


def student_fingerprint(ws: Workspace, name: str, levels: int, budget: int | None = None) -> dict:
    """A student depends on its model and data, the distill config (the loss backend aside:
    both backends compute the same loss), the seed and the joint teacher's targets, and on
    how the targets were fed: a streamed run adds its chunk-shuffled order.

    ``budget`` is the run's cache memory (cache_budget): it decides the feed, as training
    does. Without one (list, eval, export), or without a readable target cache, the feed
    the student was trained with is taken: it is a choice of the run, not of the experiment.
    """
    cfg = {k: v for k, v in vars(ws.exp.stage("distill", name)).items() if k != "loss_backend"}
    fp = drop_unset(flatten({"model": model_fingerprint(ws, name), "distill": cfg,
                             "seed": ws.exp.seed, "levels": levels,
                             "targets": content_digest(target_group(ws, levels, name).fingerprint)}))
    feed = target_feed(ws, name, levels, budget) if budget is not None else None
    return {**fp, **(feed.fingerprint() if feed is not None else _trained_order(ws, name, levels))}


def student_status(ws: Workspace, name: str, levels: int, budget: int | None = None) -> Status:
    return Artifact(ws.student_dir(name, levels)).status(
        student_fingerprint(ws, name, levels, budget))


def _with_targets(pipe, stream):
    """Pipeline batches beside their streamed targets: both slice one order alike."""
    rows = iter(stream)  # a TargetStream, or one epoch of an EpochStream
    try:
        for b in pipe:
            t = next(rows)
            if len(t["logits"]) != len(b):
                raise MlfdError(f"streamed targets out of step with the images ({len(t['logits'])} "
                                f"rows for a batch of {len(b)})")
            yield b, t
    finally:
        rows.close()  # stops the reader thread when an epoch ends early


def distill(ws: Workspace, opts: RunOptions, name: str, levels: int) -> dict:
    entry, cfg = ws.exp.entry(name), ws.exp.stage("distill", name)
    ds = dataset_of(ws, name)
    group = target_group(ws, levels, name)
    budget = cache_budget(opts)
    feed = target_feed(ws, name, levels, budget)
    streaming = feed is not None and feed.streaming
    names = target_names(group, levels)
    if streaming:
        zg = group.open_read()
        targets = {k: zg[k] for k in names}  # lazily read zarr arrays: shapes only here
        resident = group.tensors(group.load(list(feed.resident))) if feed.resident else {}
    else:
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
    backend = loss_backend(opts, opts.loss_backend or cfg.loss_backend)  # checked on CUDA
    kd_cfg = loss_config(ws, levels, name)
    if not streaming:
        dev_t = on_device(group, targets, opts.device)
    spec = input_spec(ws, name)
    out = ws.student_dir(name, levels)
    steps = (N + cfg.micro_batch - 1) // cfg.micro_batch

    def order_of(epoch):  # streamed: this rank's share of a chunk-shuffled epoch
        return chunk_order(N, epoch, ws.exp.seed, V, feed.chunk_rows, feed.window, rank(),
                           world())

    stream = None
    if streaming:
        # one reader across epochs: the next epoch's first window is read while this one
        # ends (closed after fit, below)
        stream = EpochStream(zg, names, order_of, rank_batch(cfg), epochs=cfg.epochs,
                             chunk_rows=feed.chunk_rows, window=feed.window,
                             device=opts.device, prefetch=PREFETCH, hint=group._rebuild_hint,
                             resident=resident)
        steps = -(-len(stream.order(0)) // rank_batch(cfg))  # rank 0's share is the largest
    meta = base_meta("student", dataset=name, source=entry.source, arch=entry.arch,
                     num_classes=ds.num_classes, classes=ds.classes, levels=levels,
                     input_size=entry.input_size, model_kwargs=entry.model_kwargs,
                     mean=list(ds.mean), std=list(ds.std), targets_digest=content_digest(group.fingerprint), loss=vars(kd_cfg),
                     loss_backend=backend, train=vars(cfg).copy(), seed=ws.exp.seed)

    def batches(epoch):
        if stream is not None:
            order = stream.order(epoch)  # the very pairs the stream reads: pixels match
            return _with_targets(pipeline_for(ws, opts, name, "train", spec, order,
                                              rank_batch(cfg), view_augment(ws, name)),
                                 stream.epoch(epoch))
        order = train_order(N, epoch, ws.exp.seed, V, rank(), world())  # this rank's share
        # the views the targets were cached for, AutoAugment included (replayable)
        return ((b, None) for b in pipeline_for(ws, opts, name, "train", spec, order,
                                                rank_batch(cfg), view_augment(ws, name)))

    def step(item):
        b, t = item
        if t is None:  # resident targets: gather this batch's rows
            idx, view = b.index.to(opts.device), b.view.to(opts.device)
            t = {k: gather_rows(dev_t[k], idx, view) for k in names}
        logits, embeds = student(b.images)
        loss, terms = student_loss(logits, embeds, t, b.labels, kd_cfg, backend)
        return loss, terms, len(b)

    # Exported students are plain timm models; adaptors are kept aside for inspection.
    run = TrainRun(out, meta, student_fingerprint(ws, name, levels, budget),
                   student.backbone.model.state_dict,
                   extras={"adaptors": student.adaptors.state_dict}, restart=opts.restart,
                   title=f"distill {name} L{levels}")

    log(f"[distill] {name}: {entry.arch} student, levels L1..L{levels}, loss backend {backend}, "
        f"{N} images x {V} cached views")
    if streaming:
        log(f"[distill] {name}: targets {format_size(feed.nbytes)} > cache memory "
            f"{format_size(feed.budget)}: streaming chunk-shuffled windows of {feed.window} "
            f"chunks ({feed.window * feed.chunk_rows} samples)"
            + (f", {', '.join(feed.resident)} held in memory" if feed.resident else ""))
    try:
        res = fit(title=f"distill {name} L{levels}", model=student, cfg=cfg,
                  device=opts.device, steps_per_epoch=steps, batches=batches, step=step,
                  evaluate=lambda: evaluate_images(ws, opts, name, spec, student.backbone.model),
                  run=run, used=used(opts, loss_backend=backend))
    finally:
        if stream is not None:
            stream.close()  # the reader thread reading ahead into the next epoch
    if is_main():  # under torchrun rank 0 writes; run_distill's barrier follows
        write_config(out / CONFIG_FILE, load_meta(out / "last"), student.backbone.model)
    return res.last
