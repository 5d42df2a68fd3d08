"""What `mlfd eval --plots` draws, measured on the models: penultimate features (timm's
pre-logits; the joint teacher's fused L1 embedding) of a per-class sample of the test split,
and top-1 predictions on the whole test split. Read-only, like eval: nothing is written
into a stage's results, only ``reports/``. The drawing is mlfd.figures'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.sampling import eval_order
from ..engine.artifact import Artifact
from ..engine.loop import autocast
from ..engine.progress import log
from ..errors import MlfdError
from ..fastpaths import precision
from ..workspace import Workspace
from .cache import load_teacher_inputs, teacher_group
from .common import (
    RunOptions,
    dataset_of,
    input_spec,
    load_teacher,
    pipeline_for,
    status_rows,
    trained_levels,
)
from .distill import student_status
from .evaluate import load_student
from .fuse import joint_status, load_joint
from .teach import teacher_status

# Points per map: t-SNE's cost grows with them; 1500 keeps a map to seconds on 2 cores
# (README gives the measured times) while leaving 150 points to each of 10 classes.
MAX_POINTS = 1500


@dataclass
class Panel:
    """One model's features on the sampled test rows (and, but for the joint teacher, its
    predictions on the whole test split, for the confusion matrix)."""

    model: str  # teacher | student | joint
    title: str
    features: np.ndarray  # (n, D) float32, row i is test row ``rows[i]``
    labels: np.ndarray  # (n,) classes of those rows
    y_true: np.ndarray | None = None  # (N,) the whole test split
    y_pred: np.ndarray | None = None


@dataclass
class PlotInputs:
    dataset: str
    classes: list[str]
    rows: np.ndarray  # the sampled test rows, ascending
    panels: list[Panel] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # models not there yet (or unusable)


def stratified_rows(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` row indices, an equal share per class (all of a smaller class),
    drawn with ``seed``; ascending. Every row when there are no more than ``cap``."""
    labels = np.asarray(labels)
    if len(labels) <= cap:
        return np.arange(len(labels))
    classes = np.unique(labels)
    share = max(1, cap // len(classes))
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        picked.append(idx if len(idx) <= share else rng.choice(idx, share, replace=False))
    return np.sort(np.concatenate(picked))


@torch.no_grad()
def test_pass(ws: Workspace, opts: RunOptions, name: str, model: torch.nn.Module,
              rows: np.ndarray, batch_size: int = 256
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pre-logits (len(rows), D) float32 of test rows ``rows``, top-1 predictions (N,),
    labels (N,)) of a timm model on the clean view of ``name``'s whole test split, in row
    order, as eval sees it."""
    test = dataset_of(ws, name).load("test")
    keep = np.zeros(len(test), dtype=bool)
    keep[rows] = True  # only the mapped rows' features are held (a test split may be large)
    feats, preds, labels = [], [], []
    pipe = pipeline_for(ws, opts, name, "test", input_spec(ws, name), eval_order(len(test)),
                        batch_size)
    seen = 0
    for b in pipe:
        with autocast(opts.device, precision(opts)):
            x = model.forward_features(b.images)
            pre = model.forward_head(x, pre_logits=True)
            logits = model.forward_head(x)
        mask = torch.from_numpy(keep[seen:seen + len(b)]).to(pre.device)
        feats.append(pre[mask].float().flatten(1).cpu())
        preds.append(logits.float().argmax(1).cpu())
        labels.append(b.labels.cpu())
        seen += len(b)
    if seen != len(test):  # rows are told apart by their place in the pass
        raise MlfdError(f"{name}: the test pipeline gave {seen} images, not {len(test)}")
    return (torch.cat(feats).numpy(), torch.cat(preds).numpy(),
            torch.cat(labels).numpy().astype(np.int64))


@torch.no_grad()
def joint_features(ws: Workspace, opts: RunOptions, levels: int, name: str,
                   rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fused L1 embeddings (n, D) float32, labels) of the joint teacher L``levels`` on
    test rows ``rows`` of ``name``: from the cached teacher features of those images
    (view 0, the clean one), as eval measures the joint teacher."""
    joint, _ = load_joint(ws, levels, opts.device)
    feats, labels = load_teacher_inputs(ws, levels, name, "test")
    out = []
    for s in range(0, len(rows), 1024):
        idx = torch.from_numpy(rows[s:s + 1024])
        x = [f[idx, 0].to(opts.device).float() for f in feats]
        out.append(joint(x)[0].float().cpu())
    return (torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)), labels[rows]


def _measurable(art: Artifact, status, **row) -> dict | None:
    measure, _ = status_rows(art, status, **row)
    return measure


def _stale(row: dict) -> str:
    return " (stale)" if row["status"] == "stale" else ""


def plot_inputs(ws: Workspace, opts: RunOptions, name: str,
                max_points: int = MAX_POINTS) -> PlotInputs:
    """The dataset-specific teacher, the student of the highest measurable level and the
    joint teacher (the student's level, else the highest measurable one) on ``name``'s test
    split; a model not there yet is named in ``missing``."""
    entry = ws.exp.entry(name)
    ds = dataset_of(ws, name)
    test_labels = np.asarray(ds.load("test").labels, dtype=np.int64)
    rows = stratified_rows(test_labels, max_points, ws.exp.seed)
    out = PlotInputs(name, list(ds.classes), rows)

    teacher = _measurable(Artifact(ws.teacher_dir(name)), teacher_status(ws, name))
    if teacher:
        model = load_teacher(ws, name, opts.device)[0].model
        feats, preds, labels = test_pass(ws, opts, name, model, rows)
        out.panels.append(Panel("teacher", f"teacher ({entry.arch}){_stale(teacher)}",
                                feats, labels[rows], labels, preds))
    else:
        out.missing.append("teacher")

    student_level = None
    for k in reversed(trained_levels(ws, "student", name)):
        row = _measurable(Artifact(ws.student_dir(name, k)), student_status(ws, name, k))
        if row:
            student = load_student(ws, name, k, opts.device)
            feats, preds, labels = test_pass(ws, opts, name, student, rows)
            out.panels.append(Panel("student", f"student L{k} ({entry.arch}){_stale(row)}",
                                    feats, labels[rows], labels, preds))
            student_level = k
            break
    else:
        out.missing.append("student")

    joint = [k for k in trained_levels(ws, "joint") if _measurable(
        Artifact(ws.joint_dir(k)), joint_status(ws, k)) and
        teacher_group(ws, k, name, "test").status() == "ok"]
    if joint:
        k = student_level if student_level in joint else joint[-1]
        try:
            feats, labels = joint_features(ws, opts, k, name, rows)
        except MlfdError as err:
            log(f"[plots] {name}: no joint teacher map: {err}")
            out.missing.append("joint teacher")
        else:
            if not np.array_equal(labels, test_labels[rows]):  # a cache of other test rows
                log(f"[plots] {name}: no joint teacher map: its cached test split's labels "
                    "differ from the test split's")
                out.missing.append("joint teacher")
            else:
                stale = "" if joint_status(ws, k).ok else " (stale)"
                out.panels.append(Panel("joint", f"joint teacher L{k}{stale}", feats, labels))
    else:
        out.missing.append("joint teacher")
    order = {"teacher": 0, "joint": 1, "student": 2}  # the way knowledge flows
    out.panels.sort(key=lambda p: order[p.model])
    return out


def write_plots(ws: Workspace, opts: RunOptions, markdown: Path | None = None) -> dict:
    """``reports/embeddings-<dataset>.png`` and ``reports/confusion-<dataset>.png`` for every
    dataset with a model, linked from ``markdown`` (results.md) when given; returns their
    paths as {"embeddings": [...], "confusion": [...]}."""
    from .. import figures

    out = ws.reports
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {"embeddings": [], "confusion": []}
    links: dict[str, list[Path]] = {}
    for name in ws.exp.names():
        t0 = time.perf_counter()
        inputs = plot_inputs(ws, opts, name)
        if not inputs.panels:
            log(f"[plots] {name}: no model to draw yet")
            continue
        t1 = time.perf_counter()
        note = f"no {', no '.join(inputs.missing)} yet" if inputs.missing else ""
        path = out / f"embeddings-{name}.png"
        figures.plot_embeddings(path, name, inputs.classes,
                                [(p.title, p.features, p.labels) for p in inputs.panels],
                                ws.exp.seed, note)
        paths = [path]
        written["embeddings"].append(str(path))
        mats = [(p.title, figures.confusion_counts(p.y_true, p.y_pred, len(inputs.classes)))
                for p in inputs.panels if p.y_pred is not None]
        if mats:
            path = out / f"confusion-{name}.png"
            figures.plot_confusions(path, name, inputs.classes, mats[::-1])  # student first
            paths.append(path)
            written["confusion"].append(str(path))
        links[name] = paths
        log(f"[plots] {name}: {len(inputs.panels)} maps of {len(inputs.rows)} test images "
            f"(features {t1 - t0:.1f} s, t-SNE and drawing {time.perf_counter() - t1:.1f} s)")
    if markdown is not None and links:
        figures.link_figures(markdown, links)
    return written
