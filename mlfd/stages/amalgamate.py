"""Stage `distill --amalgamate ARCH`: one student for every dataset of the experiment.

One timm backbone of architecture ARCH (no classifier) with a linear head per dataset
(the multi-head baseline's model, ``baselines.MultiDatasetModel``), tapped at L1..LK
and adapted to the joint teacher's spaces like a per-dataset student. It trains on the
union of the training splits, mixed as the joint teacher's training mixes them
(``fuse``): every epoch each dataset's samples in a shuffled pass with one of the V
cached views each, interleaved at random, so batches hold the datasets in proportion to
their sizes; one forward over the mixed batch (BatchNorm sees the mixture), then each
sample's loss against its own dataset's cached joint targets and head: the per-dataset
student's loss (Σβ·MSE on the adapted L1..LK + soft-CE on the dataset's joint logits +
CE on labels), averaged over the batch.

Input size rule: datasets may have different input sizes; the amalgamated student sees
every dataset at the LARGEST of them (bilinear resize, each dataset's own mean/std and
views), recorded in its metadata and fingerprint (``input_size``, ``input_rule``).

Targets are held in memory (all datasets' together); when they exceed the run's cache
memory the run stops with a one-line error (streaming mixes badly across datasets).

Artifact: ``students/amalgamated-<ARCH>/L<K>/`` (``last.safetensors``: ``backbone.*``
timm keys without classifier, ``heads.<d>.*`` in the experiment's dataset order;
``adaptors.safetensors``; ``config.json`` describing every head). An epoch is one pass
over the union; the distill section's values (epochs, batch size, lr, loss) apply, not
per-dataset overrides or budgets.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..cache.stream import format_size, gather_rows
from ..data.pipelines import InputSpec
from ..data.sampling import train_order
from ..engine.artifact import Artifact, Status, TrainRun
from ..engine.checkpoint import load_into, load_meta_safe
from ..engine.distributed import is_main, rank, world
from ..engine.loop import fit, seed_everything
from ..engine.progress import log
from ..errors import MlfdError
from ..fastpaths import loss_backend, used
from ..models import LevelBackbone, Student, level_shapes
from ..models.backbone import apply_init
from ..models.timm_config import CONFIG_FILE, timm_config
from ..storage.diskio import write_text
from ..storage.fingerprint import flatten
from ..workspace import Workspace
from .baselines import MultiDatasetModel, baseline_drops, baseline_model_kwargs
from .cache import content_digest, view_augment
from .common import (
    RunOptions,
    base_meta,
    dataset_of,
    drop_unset,
    evaluate_images,
    pipeline_for,
    rank_batch,
    status_rows,
    trained_levels,
)
from .distill import (
    cache_budget,
    loss_config,
    on_device,
    student_loss,
    target_feed,
    target_names,
)
from .targets import target_group

PREFIX = "amalgamated-"  # students/amalgamated-<ARCH>/L<K>/
INPUT_RULE = "largest"  # every dataset at the largest input size of the experiment


def amalgam_name(arch: str) -> str:
    return PREFIX + arch


def amalgam_dir(ws: Workspace, arch: str, levels: int):
    return ws.student_dir(amalgam_name(arch), levels)


def amalgam_archs(ws: Workspace) -> list[str]:
    """The architectures of the amalgamated students (trained or in progress) in ``ws``."""
    base = ws.root / "students"
    found = {p.name.strip(".").split(".")[0] for p in base.iterdir()
             if p.is_dir()} if base.is_dir() else set()
    return sorted(n[len(PREFIX):] for n in found if n.startswith(PREFIX))


def check_arch(arch: str) -> str:
    import timm

    if not timm.is_model(arch):
        raise MlfdError(f"--amalgamate: unknown timm architecture {arch!r} "
                        "(see timm.list_models())")
    return arch


def input_size(ws: Workspace) -> int:
    return max(e.input_size for e in ws.exp.datasets)


def amalgam_spec(ws: Workspace, name: str, size: int) -> InputSpec:
    """Dataset ``name`` as the amalgamated student sees it: ``size``, its own statistics."""
    ds = dataset_of(ws, name)
    return InputSpec((size, size), 3, tuple(ds.mean), tuple(ds.std))


def amalgam_fingerprint(ws: Workspace, arch: str, levels: int) -> dict:
    """Model and input rule, the distill section (loss backend aside, as for students),
    seed, every dataset's data and views, and every dataset's joint targets."""
    names = ws.exp.names()
    cfg = {k: v for k, v in vars(ws.exp.stage("distill")).items() if k != "loss_backend"}
    model = {"arch": arch, "input_size": input_size(ws), "input_rule": INPUT_RULE,
             "model_kwargs": baseline_model_kwargs(ws.exp, arch), **baseline_drops(ws.exp, arch)}
    return drop_unset(flatten({
        "amalgamate": model, "distill": cfg, "seed": ws.exp.seed, "levels": levels,
        "data": {n: dataset_of(ws, n).fingerprint() for n in names},
        "hflip": {e.name: e.hflip for e in ws.exp.datasets},
        "targets": {n: content_digest(target_group(ws, levels, n).fingerprint) for n in names}}))


def amalgam_status(ws: Workspace, arch: str, levels: int) -> Status:
    return Artifact(amalgam_dir(ws, arch, levels)).status(amalgam_fingerprint(ws, arch, levels))


def mixed_order(sizes: list[int], epoch: int, seed: int, views: int) -> np.ndarray:
    """(M, 3) rows (dataset, sample, view) of one epoch over the union: per dataset a
    shuffled pass with one cached view per sample, then all of them interleaved."""
    rows = np.concatenate([np.column_stack([np.full(n, d), train_order(n, epoch, seed + d, views)])
                           for d, n in enumerate(sizes)])
    return rows[np.random.default_rng([seed, epoch, 7]).permutation(len(rows))]


def _take(it, buf: list, n: int):
    """The next ``n`` samples of a pipeline's batches (cut or joined as needed)."""
    from ..data.pipelines import Batch

    while sum(len(b) for b in buf) < n:
        buf.append(next(it))
    fields = [torch.cat([getattr(b, f) for b in buf]) for f in ("images", "labels", "index",
                                                                   "view")]
    out, rest = Batch(*(x[:n] for x in fields)), Batch(*(x[n:] for x in fields))
    buf[:] = [rest] if len(rest) else []
    return out


def mixed_batches(pipes: list, counts: np.ndarray):
    """Per step, [(dataset, Batch)] of ``counts[step, dataset]`` samples each, read in
    order from each dataset's pipeline (whose order is its rows of the mixed order)."""
    its, bufs = [iter(p) for p in pipes], [[] for _ in pipes]
    for row in counts:
        yield [(d, _take(its[d], bufs[d], int(c))) for d, c in enumerate(row) if c]


def amalgamate(ws: Workspace, opts: RunOptions, arch: str, levels: int) -> dict:
    names = ws.exp.names()
    cfg, size = ws.exp.stage("distill"), input_size(ws)
    data = [dataset_of(ws, n) for n in names]
    groups = [target_group(ws, levels, n) for n in names]
    budget = cache_budget(opts)
    feeds = [target_feed(ws, n, levels, budget) for n in names]
    need = sum(f.nbytes for f in feeds if f is not None)
    if need > budget:
        raise MlfdError(f"the amalgamated student holds every dataset's targets in memory "
                        f"({format_size(need)}), more than the cache memory "
                        f"({format_size(budget)}): raise --cache-memory")
    targets = [g.load() for g in groups]
    sizes = [int(t["logits"].shape[0]) for t in targets]
    V = int(targets[0]["logits"].shape[1])
    for n, ds, N in zip(names, data, sizes):
        if len(ds.load("train")) != N:
            raise MlfdError(f"target cache of {n} has {N} samples, dataset has "
                            f"{len(ds.load('train'))}: re-run `mlfd cache --force`")
    dev_t = [on_device(g, t, opts.device) for g, t in zip(groups, targets)]
    t_names = [target_names(g, levels) for g in groups]
    seed_everything(ws.exp.seed)
    net = MultiDatasetModel(check_arch(arch), [d.num_classes for d in data], "multi-head",
                            **baseline_drops(ws.exp, arch), **baseline_model_kwargs(ws.exp, arch))
    tapped = LevelBackbone(net.backbone)
    tapped.check_levels(levels)
    t_shapes = [tuple(targets[0][f"L{k + 1}"].shape[2:]) for k in range(levels)]
    student = Student(tapped, level_shapes(tapped, size, levels), t_shapes)
    student.heads = net.heads  # trained (and resumed) with the student
    student.to(opts.device)
    apply_init(student, cfg.init)
    backend = loss_backend(opts, opts.loss_backend or cfg.loss_backend)
    kd_cfg = loss_config(ws, levels)
    specs = [amalgam_spec(ws, n, size) for n in names]
    total, bs = sum(sizes), rank_batch(cfg)
    steps = -(-total // cfg.micro_batch)
    out = amalgam_dir(ws, arch, levels)

    def batches(epoch):
        rows = mixed_order(sizes, epoch, ws.exp.seed, V)
        mine = [rows[s:s + cfg.micro_batch][rank()::world()] for s in range(0, total,
                                                                            cfg.micro_batch)]
        mine = [r for r in mine if len(r)]  # none: the last batch is smaller than the world
        counts = np.stack([np.bincount(r[:, 0], minlength=len(names)) for r in mine])
        flat = np.concatenate(mine)
        pipes = [pipeline_for(ws, opts, n, "train", specs[d], flat[flat[:, 0] == d][:, 1:], bs,
                              view_augment(ws, n)) for d, n in enumerate(names)]
        return mixed_batches(pipes, counts)

    def step(parts):
        feats, embeds = student(torch.cat([b.images for _, b in parts]))
        n = sum(len(b) for _, b in parts)
        loss, terms, start = 0.0, {}, 0
        for d, b in parts:
            part = slice(start, start + len(b))
            start += len(b)
            idx, view = b.index.to(opts.device), b.view.to(opts.device)
            t = {k: gather_rows(dev_t[d][k], idx, view) for k in t_names[d]}
            ld, td = student_loss(net.heads[d](feats[part]), [e[part] for e in embeds], t,
                                  b.labels, kd_cfg, backend)
            w = len(b) / n  # each sample counts once in the batch mean
            loss = loss + w * ld
            for k, v in td.items():
                terms[k] = terms.get(k, 0.0) + w * v
        return loss, terms, n

    def evaluate():
        row = {}
        for d, name in enumerate(names):
            r = evaluate_images(ws, opts, name, specs[d], lambda x, d=d: net(x, d))
            row[f"{name}/top1"], row[f"{name}/top5"] = r["top1"], r["top5"]
        row["top1"] = float(np.mean([row[f"{n}/top1"] for n in names]))
        return row

    meta = base_meta("amalgamated", arch=arch, datasets=names,
                     num_classes=[d.num_classes for d in data],
                     classes=[list(map(str, d.classes)) for d in data], levels=levels,
                     input_size=size, input_rule=INPUT_RULE,
                     model_kwargs=baseline_model_kwargs(ws.exp, arch),
                     mean=[list(d.mean) for d in data], std=[list(d.std) for d in data],
                     targets_digest={n: content_digest(g.fingerprint)
                                     for n, g in zip(names, groups)},
                     loss=vars(kd_cfg), loss_backend=backend, train=vars(cfg).copy(),
                     seed=ws.exp.seed, **baseline_drops(ws.exp, arch))
    run = TrainRun(out, meta, amalgam_fingerprint(ws, arch, levels), net.state_dict,
                   extras={"adaptors": student.adaptors.state_dict}, restart=opts.restart,
                   title=f"amalgamate {arch} L{levels}")
    log(f"[distill] amalgamated {arch} student over {len(names)} datasets ({', '.join(names)}), "
        f"levels L1..L{levels}, input {size}px (the largest), loss backend {backend}, "
        f"{total} images x {V} cached views")
    res = fit(title=f"amalgamate {arch} L{levels}", model=student, cfg=cfg, device=opts.device,
              steps_per_epoch=steps, batches=batches, step=step, evaluate=evaluate, run=run,
              used=used(opts, loss_backend=backend))
    if is_main():  # under torchrun rank 0 writes; run_distill's barrier follows
        config = heads_config(load_meta_safe(out / "last"), net.backbone.num_features)
        write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return res.last


def head_meta(meta: dict, d: int) -> dict:
    """The metadata of head ``d`` as a per-dataset student's (for its timm config)."""
    return {"arch": meta["arch"], "num_classes": meta["num_classes"][d],
            "classes": meta["classes"][d], "input_size": meta["input_size"],
            "model_kwargs": meta.get("model_kwargs") or {}, "mean": meta["mean"][d],
            "std": meta["std"][d]}


def heads_config(meta: dict, num_features: int, heads: list[int] | None = None) -> dict:
    """config.json of an amalgamated student: with one head, the timm config of that
    dataset's classifier; with all (``heads`` None), the timm config of the backbone without
    classifier (``num_classes`` 0). Either way ``amalgamated`` names the heads it holds,
    with each head's classes and preprocessing."""
    heads = list(range(len(meta["datasets"]))) if heads is None else heads
    if len(heads) == 1:
        config = timm_config(head_meta(meta, heads[0]), num_features)
    else:
        config = timm_config(dict(head_meta(meta, 0), num_classes=0, classes=None),
                             num_features)
        config["pretrained_cfg"].pop("mean"), config["pretrained_cfg"].pop("std")
    config["amalgamated"] = {
        "arch": meta["arch"], "levels": meta["levels"], "datasets": meta["datasets"],
        "input_rule": meta.get("input_rule", INPUT_RULE),
        "heads": [{"dataset": meta["datasets"][d], "index": d,
                   "num_classes": meta["num_classes"][d],
                   "label_names": [str(c) for c in meta["classes"][d]],
                   "mean": head_meta(meta, d)["mean"], "std": head_meta(meta, d)["std"],
                   **({"weight": f"heads.{d}.weight", "bias": f"heads.{d}.bias"}
                      if len(heads) > 1 else {})}
                  for d in heads]}
    return config


def load_amalgam(stem, meta: dict, device) -> MultiDatasetModel:
    """The amalgamated student (backbone and every head) of checkpoint ``stem``."""
    kw = {k: meta[k] for k in ("drop_rate", "drop_path_rate") if k in meta}
    net = MultiDatasetModel(meta["arch"], meta["num_classes"], "multi-head",
                            **kw, **(meta.get("model_kwargs") or {}))
    load_into(net, stem, f"amalgamated {meta['arch']} student")
    return net.to(device).eval()


def amalgam_rows(ws: Workspace, opts: RunOptions) -> list[dict]:
    """Test accuracy of every amalgamated student, one row per dataset (model
    "amalgamated"), measured through each dataset's head at the student's input size."""
    rows = []
    names = ws.exp.names()
    for arch in amalgam_archs(ws):
        for k in trained_levels(ws, "student", amalgam_name(arch)):
            art = Artifact(amalgam_dir(ws, arch, k))
            meta = load_meta_safe(art.readable() / "last") or art.partial() or {}
            if meta.get("datasets") != names:
                log(f"[eval] skipping amalgamated {arch} L{k}: trained on other datasets")
                continue
            row, listed = status_rows(art, amalgam_status(ws, arch, k), model="amalgamated",
                                      arch=arch, levels=k)
            rows += [dict(r, dataset=n) for r in listed for n in names]
            if row is None:
                continue
            stem = art.final / "last"
            done = load_meta_safe(stem) or {}
            net = load_amalgam(stem, done, opts.device)
            for d, name in enumerate(names):
                spec = amalgam_spec(ws, name, int(done["input_size"]))
                r = evaluate_images(ws, opts, name, spec, lambda x, m=net, d=d: m(x, d))
                rows.append(dict(row, dataset=name, **r))
    return rows


def exported_head(folder, cfg: dict, dataset: str | None):
    """(model, head) of a folder `mlfd export --amalgamated` wrote (``cfg``: its config.json):
    ``model`` maps a normalised batch to the head's logits, ``head`` is the head's entry in
    ``cfg["amalgamated"]["heads"]`` (dataset, label_names, mean, std). A one-head folder
    takes no ``dataset`` or its own; an all-heads folder needs one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import CorruptArtifact
    from ..models import create_backbone
    from ..models.timm_config import WEIGHTS_FILE

    heads = cfg["amalgamated"]["heads"]
    names = [h["dataset"] for h in heads]
    if dataset is None and len(heads) > 1:
        raise MlfdError(f"{folder} holds the heads of {', '.join(names)}: pick one with "
                        "--dataset")
    if dataset is not None and dataset not in names:
        raise MlfdError(f"{folder} has no head for {dataset!r} (it holds {', '.join(names)})")
    head = heads[names.index(dataset) if dataset is not None else 0]
    model = create_backbone(cfg["architecture"], int(cfg["num_classes"]),
                            **(cfg.get("model_args") or {}))
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
        if len(heads) > 1:  # the backbone without classifier, the heads beside it
            state = load_file(str(folder / "heads.safetensors"))
            fc = torch.nn.Linear(model.num_features, int(head["num_classes"]))
            fc.load_state_dict({"weight": state[head["weight"]], "bias": state[head["bias"]]})
            model = torch.nn.Sequential(model, fc)
    except (OSError, RuntimeError, KeyError, SafetensorError) as e:
        raise CorruptArtifact(f"{folder} does not hold the amalgamated {cfg['architecture']} "
                              f"its config.json describes: {str(e).splitlines()[0]}") from None
    return model.eval().requires_grad_(False), head
