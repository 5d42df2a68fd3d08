"""Stage `eval`: top-1/top-5 of every trained model on its test split (or the holdout).

Only complete results are measured. Each row carries a ``status``: ``complete``, ``stale``
(complete, but made for other inputs than the experiment now asks for: measured and
marked), or ``incomplete`` / ``corrupt`` (listed without numbers, never as results).
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.artifact import Artifact
from ..engine.checkpoint import load_into, load_meta
from ..engine.metrics import Accuracy
from ..engine.progress import log
from ..errors import MlfdError
from ..models import create_backbone
from ..workspace import Workspace
from .amalgamate import amalgam_rows
from .baselines import baseline_rows
from .cache import load_teacher_inputs, teacher_group
from .common import (
    RunOptions,
    eval_split,
    evaluate_images,
    input_spec,
    load_teacher,
    status_rows,
    trained_levels,
)
from .distill import student_status
from .fuse import joint_status, load_joint
from .teach import teacher_status


def load_student(ws: Workspace, name: str, levels: int, device) -> torch.nn.Module:
    """A distilled student as the plain timm model it was exported as."""
    stem = ws.student_dir(name, levels) / "last"
    meta = load_meta(stem)
    model = create_backbone(meta["arch"], meta["num_classes"], **meta.get("model_kwargs", {}))
    load_into(model, stem, f"{meta['arch']} student of {name}")
    return model.to(device).eval()


@torch.no_grad()
def joint_accuracy(ws: Workspace, opts: RunOptions, levels: int) -> dict[str, dict]:
    joint, _ = load_joint(ws, levels, opts.device)
    out = {}
    for d, name in enumerate(ws.exp.names()):
        feats, labels = load_teacher_inputs(ws, levels, name, "test")
        acc = Accuracy()
        for s in range(0, len(labels), 1024):
            idx = np.arange(s, min(len(labels), s + 1024))
            x = [f[torch.from_numpy(idx), 0].to(opts.device).float() for f in feats]
            acc.update(joint.logits(joint(x)[0], d).float(),
                       torch.from_numpy(labels[idx]).to(opts.device))
        out[name] = acc.result()
    return out


def evaluate(ws: Workspace, opts: RunOptions) -> list[dict]:
    """Rows {dataset, model, arch, levels, status, top1, top5, n, ...} for every model
    (an amalgamated student: one row per dataset, model "amalgamated")."""
    rows = []
    for e in ws.exp.datasets:
        spec = input_spec(ws, e.name)
        art = Artifact(ws.teacher_dir(e.name))
        row, listed = status_rows(art, teacher_status(ws, e.name), dataset=e.name,
                                  model="teacher", arch=e.arch, levels=None)
        if row:
            teacher, _ = load_teacher(ws, e.name, opts.device)
            rows.append(dict(row, **evaluate_images(ws, opts, e.name, spec, teacher.model)))
        rows += listed
        for k in trained_levels(ws, "student", e.name):
            art = Artifact(ws.student_dir(e.name, k))
            row, listed = status_rows(art, student_status(ws, e.name, k), dataset=e.name,
                                      model="student", arch=e.arch, levels=k)
            if row:
                student = load_student(ws, e.name, k, opts.device)
                rows.append(dict(row, **evaluate_images(ws, opts, e.name, spec, student)))
            rows += listed
    for k in trained_levels(ws, "joint"):
        row, listed = status_rows(Artifact(ws.joint_dir(k)), joint_status(ws, k),
                                  model="joint", arch="joint", levels=k)
        rows += [dict(r, dataset=n) for r in listed for n in ws.exp.names()]
        if row is None:
            continue
        if any(teacher_group(ws, k, n, "test").status() != "ok" for n in ws.exp.names()):
            log(f"[eval] skipping joint teacher L{k}: its teacher cache is missing or stale")
            continue
        try:
            accs = joint_accuracy(ws, opts, k)
        except MlfdError as err:
            log(f"[eval] skipping joint teacher L{k}: {err}")
            continue
        rows += [dict(row, dataset=name, **r) for name, r in accs.items()]
    rows += baseline_rows(ws, opts)
    rows += amalgam_rows(ws, opts)
    order = {"teacher": 0, "multi-head": 1, "joint-head": 2, "joint": 3, "student": 4,
             "amalgamated": 5}
    names = ws.exp.names()
    rows.sort(key=lambda r: (names.index(r["dataset"]), order[r["model"]], r["levels"] or 0,
                             r["status"] == "incomplete"))
    split = eval_split(ws)
    return [dict(r, split=split) for r in rows]
