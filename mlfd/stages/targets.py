"""Stage `cache`, part 2: the joint teacher's distillation targets.

Once a joint teacher exists, it runs over the teacher-embedding cache (part 1,
mlfd.stages.cache) and stores, per training image and view, its logits for the image's
own dataset and its embeddings L1..LK: what each student is distilled against.

Under torchrun every rank extracts: rank 0 decides what is missing and lays each group
out, each rank computes and writes its own shard-aligned range of every array (no two
ranks write one file, so no locks), and rank 0 checks that every range is in before it
writes the manifest and promotes the group.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cache import CacheGroup, CacheWriter
from ..cache.quant import TOPK_INDEX, index_dtype, topk_active, topk_pack
from ..engine.checkpoint import load_meta_safe
from ..engine.distributed import is_main, on_main
from ..engine.progress import log
from ..storage.uri import join
from ..workspace import Workspace
from .cache import (
    cache_group,
    close_writer,
    content_digest,
    embedding_fingerprint,
    load_teacher_inputs,
    storage_values,
    teacher_group,
    writer_for,
)
from .common import RunOptions
from .fuse import joint_forward_cached, load_joint


def target_fingerprint(ws: Workspace, levels: int, data_name: str) -> dict:
    stem = ws.joint_dir(levels) / "last"
    sha = (load_meta_safe(stem) or {}).get("sha256")
    return {"kind": "joint-targets", "level": levels, "dataset": data_name, "split": "train",
            "joint_sha256": sha, "teacher_cache": content_digest(embedding_fingerprint(
                ws, levels, data_name, "train")), **storage_values(ws, targets=True)}


def target_group(ws: Workspace, levels: int, data_name: str) -> CacheGroup:
    return cache_group(ws, join(ws.target_cache(levels), data_name, "train"),
                  target_fingerprint(ws, levels, data_name))


def _spans(writer: CacheWriter, names) -> list[tuple[int, int]]:
    """The rows still to compute for arrays ``names``: from each one's cursor to the end
    of its range, merged into disjoint [start, stop) spans in order."""
    spans: list[list[int]] = []
    for start, stop in sorted((writer.cursor(k), writer.rows(k)[1]) for k in names):
        if start >= stop:
            continue
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], stop)
        else:
            spans.append([start, stop])
    return [(a, b) for a, b in spans]


def _labels(group: CacheGroup) -> np.ndarray:
    return group.load(["labels"])["labels"]


def _stale_target_groups(ws: Workspace, opts: RunOptions, levels: int,
                         names: list[str]) -> list[str]:
    todo = [n for n in names if opts.force or target_group(ws, levels, n).status() != "ok"]
    for n in todo:
        log(f"[cache] targets L{levels} {n}: {target_group(ws, levels, n).reason()}")
    return todo


@torch.no_grad()
def cache_targets(ws: Workspace, opts: RunOptions, levels: int,
                  names: list[str] | None = None) -> list[str]:
    """Joint-teacher logits and L1..LK for every (train image, view) of the given datasets.
    Under torchrun every rank must call it: each computes its own rows."""
    names = names or ws.exp.names()
    todo = on_main(_stale_target_groups, ws, opts, levels, names)
    if not todo:
        return []
    joint, _ = load_joint(ws, levels, opts.device)
    dtype = ws.exp.cache.dtype
    for name in todo:
        d_idx = ws.exp.names().index(name)
        group, inputs = target_group(ws, levels, name), teacher_group(ws, levels, name, "train")
        # first, and by rank 0 alone: it checks the teacher cache (and records the check,
        # which the other ranks' checks then find)
        labels = on_main(_labels, inputs)
        N, V = inputs.shapes()[ws.exp.datasets[0].name][:2]
        C, K = joint.num_classes[d_idx], ws.exp.cache.logits_topk
        topk = topk_active(K, C)  # K >= C: every logit is kept, as without top-K
        arrays = {"logits": ((N, V, K + 1 if topk else C), dtype), "labels": ((N,), "int64")}
        if topk:
            arrays[TOPK_INDEX] = ((N, V, K), index_dtype(C))
        for k, shape in enumerate(joint.embed_shapes):
            arrays[f"L{k + 1}"] = ((N, V, *shape), dtype)
        writer = writer_for(group, arrays, opts.restart)
        writer.append("labels", labels, start=0)
        # Each batch gives every array its rows: the spans cover what each array still
        # needs (in one process: from the least-written array's cursor on). Where arrays'
        # shards hold different row counts, their ranges differ: a rank computes the union.
        spans = _spans(writer, [k for k in arrays if k != "labels"])
        lo, hi = (spans[0][0], spans[-1][1]) if spans else (0, 0)
        feats, _ = load_teacher_inputs(ws, levels, name, "train", (lo, hi))  # only its rows
        bs = max(1, 1024 // V)
        for first, last in spans:
            for start in range(first, last, bs):
                rows = np.repeat(np.arange(start, min(last, start + bs)), V)
                views = np.tile(np.arange(V), len(rows) // V)
                emb = joint_forward_cached(joint, feats, rows - lo, views, opts.device)
                logits = joint.logits(emb[0], d_idx)
                logits = logits.reshape(-1, V, logits.shape[1])
                if topk:
                    logits, index = topk_pack(logits, K)
                    writer.append(TOPK_INDEX, index, start=start)
                writer.append("logits", logits, start=start)
                for k, e in enumerate(emb):
                    writer.append(f"L{k + 1}", e.reshape(-1, V, *e.shape[1:]), start=start)
        close_writer(writer)
        if is_main():
            log(f"[cache] targets L{levels} {name}: {N}x{V} views, "
                f"{group.nbytes() / 2**20:.1f} MiB")
    return todo
