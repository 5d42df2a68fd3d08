"""Stage `eval`: top-1/top-5 of every trained model on its test split."""

from __future__ import annotations

import numpy as np
import torch

from ..engine.checkpoint import load_into, load_meta
from ..engine.metrics import Accuracy
from ..engine.progress import log
from ..errors import MlfdError
from ..models import create_backbone
from ..workspace import Workspace
from .baselines import baseline_rows
from .cache import load_joint, load_teacher_inputs, teacher_group
from .common import RunOptions, evaluate_images, input_spec, load_teacher


def trained_levels(ws: Workspace, kind: str, name: str | None = None) -> list[int]:
    base = ws.root / "joint" if kind == "joint" else ws.root / "students" / str(name)
    if not base.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in base.glob("L*")
                  if p.name[1:].isdigit() and (p / "last.safetensors").exists())


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
            x = [torch.from_numpy(f[idx, 0]).to(opts.device).float() for f in feats]
            acc.update(joint.logits(joint(x)[0], d).float(),
                       torch.from_numpy(labels[idx]).to(opts.device))
        out[name] = acc.result()
    return out


def evaluate(ws: Workspace, opts: RunOptions) -> list[dict]:
    """Rows {dataset, model, arch, levels, top1, top5, n} for every trained model."""
    rows = []
    for e in ws.exp.datasets:
        spec = input_spec(ws, e.name)
        if (ws.teacher_dir(e.name) / "last.safetensors").exists():
            teacher, meta = load_teacher(ws, e.name, opts.device)
            r = evaluate_images(ws, opts, e.name, spec, teacher.model)
            rows.append(dict(dataset=e.name, model="teacher", arch=e.arch, levels=None,
                             epoch=meta.get("epoch"), **r))
        for k in trained_levels(ws, "student", e.name):
            student = load_student(ws, e.name, k, opts.device)
            r = evaluate_images(ws, opts, e.name, spec, student)
            rows.append(dict(dataset=e.name, model="student", arch=e.arch, levels=k,
                             epoch=load_meta(ws.student_dir(e.name, k) / "last").get("epoch"),
                             **r))
    for k in trained_levels(ws, "joint"):
        if any(teacher_group(ws, k, n, "test").status() != "ok" for n in ws.exp.names()):
            log(f"[eval] skipping joint teacher L{k}: its teacher cache is missing or stale")
            continue
        try:
            accs = joint_accuracy(ws, opts, k)
        except MlfdError as err:
            log(f"[eval] skipping joint teacher L{k}: {err}")
            continue
        epoch = load_meta(ws.joint_dir(k) / "last").get("epoch")
        for name, r in accs.items():
            rows.append(dict(dataset=name, model="joint", arch="joint", levels=k, epoch=epoch, **r))
    rows += baseline_rows(ws, opts)
    order = {"teacher": 0, "multi-head": 1, "joint-head": 2, "joint": 3, "student": 4}
    names = ws.exp.names()
    rows.sort(key=lambda r: (names.index(r["dataset"]), order[r["model"]], r["levels"] or 0))
    return rows
