"""Stage `cache`, part 1: teacher embeddings at the fusion level.

Every frozen teacher runs once over the images of *all* datasets (V views of each
training image, the clean view of each test image) and its L_K embedding is stored, so
training the joint teacher never runs a backbone. Part 2, the joint teacher's targets,
is mlfd.stages.targets; the stores' layout is mlfd.cache.

Under torchrun every rank extracts: rank 0 decides what is missing and lays each group
out, each rank computes and writes its own shard-aligned range of every array (no two
ranks write one file, so no locks), and rank 0 checks that every range is in before it
writes the manifest and promotes the group.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cache import CacheGroup, CacheWriter, digest
from ..cache.quant import QUANTISED
from ..data.sampling import eval_order
from ..engine.checkpoint import load_meta_safe
from ..engine.distributed import barrier, gather_object, is_main, on_main, rank, world
from ..engine.progress import log, progress
from ..models import level_shapes
from ..storage.uri import join
from ..workspace import Workspace
from .common import RunOptions, dataset_of, input_spec, load_teacher, pipeline_for

SPLITS = ("train", "test")


def _views(ws: Workspace, split: str) -> int:
    return ws.exp.cache.views if split == "train" else 1


def view_augment(ws: Workspace, data_name: str, split: str = "train") -> str | None:
    """The AutoAugment policy of cached views > 0: the one the dataset's teacher and the
    baselines train with, so students see the same augmentation family (replayable per
    (seed, sample, view) in both pipelines). Test images have only the clean view."""
    return ws.exp.stage("teach", data_name).auto_augment if split == "train" else None


def embedding_fingerprint(ws: Workspace, levels: int, data_name: str, split: str) -> dict:
    teachers = {}
    for e in ws.exp.datasets:
        stem = ws.teacher_dir(e.name) / "last"
        sha = (load_meta_safe(stem) or {}).get("sha256")
        teachers[e.name] = {"sha256": sha, "arch": e.arch,
                            "input": input_spec(ws, e.name).to_dict()}
    return {
        "kind": "teacher-embeddings", "level": levels, "dataset": data_name,
        "dataset_fingerprint": dataset_of(ws, data_name).fingerprint(), "split": split,
        "views": _views(ws, split), "view_seed": ws.exp.seed,
        "view_config": {"hflip": ws.exp.entry(data_name).hflip},
        **storage_values(ws), "teachers": digest(teachers),
        # only when set: caches made without AutoAugment keep their fingerprint
        **({"auto_augment": p} if (p := view_augment(ws, data_name, split)) else {}),
    }


def embedding_dtype(ws: Workspace) -> str:
    """The teacher-embedding cache's dtype: ``int8`` targets keep float16 embeddings, so
    the joint teacher trains on the inputs it had (and switching targets to int8 reuses
    this cache and the joint teacher: only the targets and students are rebuilt)."""
    return "float16" if ws.exp.cache.dtype == QUANTISED else ws.exp.cache.dtype


def storage_values(ws: Workspace, targets: bool = False) -> dict:
    """How values are stored: in the fingerprints, so a change rebuilds the caches. Where
    they are stored (cache.uri) is not: a moved cache is the same cache. ``targets``: of
    the joint targets (int8, top-K logits); else of the teacher embeddings."""
    c = ws.exp.cache
    if not targets:
        return {"dtype": embedding_dtype(ws), "codec": c.codec, "clevel": c.clevel}
    # top-K only when set: caches made before it keep their fingerprint
    return {"dtype": c.dtype, "codec": c.codec, "clevel": c.clevel,
            **({"logits_topk": c.logits_topk} if c.logits_topk else {})}


# Lossless storage choices: they rebuild a cache, never what is computed from its values.
_LOSSLESS = ("codec", "clevel")


def content_digest(fingerprint: dict) -> str:
    """Digest of what a cache's values depend on (dtype included: it rounds), for the
    fingerprints of models trained from them: recompressing a cache retrains nothing."""
    return digest({k: v for k, v in fingerprint.items() if k not in _LOSSLESS})


def cache_group(ws: Workspace, location, fingerprint: dict) -> CacheGroup:
    return CacheGroup(location, fingerprint, codec=ws.exp.cache.codec, clevel=ws.exp.cache.clevel)


def teacher_group(ws: Workspace, levels: int, data_name: str, split: str) -> CacheGroup:
    return cache_group(ws, join(ws.teacher_cache(levels), data_name, split),
                  embedding_fingerprint(ws, levels, data_name, split))


def check_levels(ws: Workspace, levels: int) -> list[list[tuple[int, ...]]]:
    """Per-teacher shapes of L1..LK, with a clear error if a teacher lacks level K."""
    from ..models import build_level_backbone

    shapes = []
    for e in ws.exp.datasets:
        bb = build_level_backbone(e, dataset_of(ws, e.name).num_classes)
        bb.check_levels(levels)
        shapes.append(level_shapes(bb, e.input_size, levels))
    return shapes


def writer_for(group: CacheGroup, arrays: dict, restart: bool) -> CacheWriter:
    """This process's writer of ``group``: of every row in one process; under torchrun of
    its rank's rows, once rank 0 has created (or resumed) the staging group and shared
    the rows out (``on_main`` returns on every rank only after rank 0's part is done)."""
    if world() == 1:
        return group.begin(arrays, restart=restart)
    shares = on_main(group.prepare, arrays, world(), restart)
    return group.join(arrays, shares, rank())


def close_writer(writer: CacheWriter) -> None:
    """Every rank's rows in: the group's manifest is written and the group promoted (by
    rank 0, from what every rank reports), before any rank goes on to read it."""
    if world() == 1:
        writer.close()
        return
    held = gather_object(writer.held())
    if is_main():
        writer.close(held)
    barrier()


def _stale_teacher_groups(ws: Workspace, opts: RunOptions, levels: int) -> list[tuple[str, str]]:
    todo = [(d.name, s) for d in ws.exp.datasets for s in SPLITS
            if opts.force or teacher_group(ws, levels, d.name, s).status() != "ok"]
    for d, s in todo:
        log(f"[cache] teachers L{levels} {d}/{s}: {teacher_group(ws, levels, d, s).reason()}")
    return todo


@torch.no_grad()
def cache_teachers(ws: Workspace, opts: RunOptions, levels: int) -> list[str]:
    """Write every missing or stale teacher-embedding group; returns what was (re)written.
    Under torchrun every rank must call it: each renders and embeds its own rows."""
    from ..engine.loop import autocast
    from ..fastpaths import precision

    dtype = embedding_dtype(ws)
    # rank 0 inspects (and may recover) the groups; the others follow its list
    todo = on_main(_stale_teacher_groups, ws, opts, levels)
    if not todo:
        return []
    teachers = [load_teacher(ws, e.name, opts.device)[0] for e in ws.exp.datasets]
    shapes = [level_shapes(t, e.input_size, levels)[levels - 1]
              for t, e in zip(teachers, ws.exp.datasets)]
    bs = ws.exp.cache.batch_size
    with progress() as prog:
        for data_name, split in todo:
            data = dataset_of(ws, data_name).load(split)
            V = _views(ws, split)
            group = teacher_group(ws, levels, data_name, split)
            arrays = {e.name: ((len(data), V, *shape), dtype)
                      for e, shape in zip(ws.exp.datasets, shapes)}
            arrays["labels"] = ((len(data),), "int64")
            writer = writer_for(group, arrays, opts.restart)
            writer.append("labels", np.asarray(data.labels, dtype=np.int64), start=0)
            batch = max(V, bs // V * V)  # whole samples per batch: rows reshape to (b, V, ...)
            for t, e in zip(teachers, ws.exp.datasets):
                # from where an interrupted extraction stopped (a whole shard) to the end of
                # this rank's range (all rows in one process)
                start, stop = writer.cursor(e.name), writer.rows(e.name)[1]
                if start == stop:
                    continue
                order = eval_order(len(data), V)[start * V:stop * V]
                task = prog.add_task(f"cache L{levels} {e.name} on {data_name}/{split}",
                                     total=(len(order) + batch - 1) // batch, items=0, info="",
                                     unit="img")
                pipe = pipeline_for(ws, opts, data_name, split, input_spec(ws, e.name), order,
                                    batch, view_augment(ws, data_name, split))
                seen = 0
                for b in pipe:
                    with autocast(opts.device, precision(opts)):
                        _, emb = t(b.images, levels)
                    feat = emb[levels - 1].float()
                    writer.append(e.name, feat.reshape(-1, V, *feat.shape[1:]),
                                  start=start + seen // V)
                    seen += len(b)
                    prog.update(task, advance=1, items=seen)
            close_writer(writer)
            if is_main():  # the others must not read the group while rank 0 promotes it
                log(f"[cache] teachers L{levels} {data_name}/{split}: {len(data)}x{V} views, "
                    f"{group.nbytes() / 2**20:.1f} MiB")
    return [f"{d}/{s}" for d, s in todo]


def load_teacher_inputs(ws: Workspace, levels: int, data_name: str, split: str,
                        rows: tuple[int, int] | None = None):
    """(list of per-teacher CPU tensors (N, V, ...) in the cache's dtype, labels (N,) as
    numpy) from a checked cache group; index them with index tensors. With ``rows``
    (start, stop): those rows only, row ``start`` at index 0."""
    group = teacher_group(ws, levels, data_name, split)
    arrays = group.tensors(group.load(rows=rows))
    return [arrays[e.name] for e in ws.exp.datasets], arrays["labels"].numpy()
