"""`mlfd eval --plots` (issue 18 §2): t-SNE maps of the test features of the teacher, joint
teacher and student, and confusion matrices, in reports/ and linked from results.md."""

import copy
import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from helpers import LOCAL, bad, run, tree_snapshot

from mlfd.data.sampling import eval_order
from mlfd.figures import confusion_counts, project
from mlfd.stages import RunOptions
from mlfd.stages.cache import load_teacher_inputs
from mlfd.stages.common import dataset_of, input_spec, load_teacher, pipeline_for
from mlfd.stages.embeddings import plot_inputs, stratified_rows
from mlfd.stages.evaluate import load_student
from mlfd.stages.fuse import load_joint
from mlfd.workspace import Workspace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CPU = RunOptions(device=torch.device("cpu"), pipeline="torch")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_eval_plots_writes_linked_pngs_and_only_into_reports(ws, capsys):
    before = {k: v for k, v in tree_snapshot(ws).items() if not k.startswith("reports")}
    code, out, err = run(capsys, "eval", "--workdir", ws, "--json", "--plots", *LOCAL)
    assert code == 0, err
    reports = json.loads(out)["reports"]
    rep = ws / "reports"
    assert reports["embeddings"] == [str(rep / "embeddings-alpha.png"),
                                     str(rep / "embeddings-beta.png")]
    assert reports["confusion"] == [str(rep / "confusion-alpha.png"),
                                    str(rep / "confusion-beta.png")]
    # alpha: teacher, joint teacher and student: three 4.5-inch maps + a 2.2-inch legend at
    # 100 dpi, 4.5 + 0.8 inches high; beta has no student yet: two maps.
    assert png_size(rep / "embeddings-alpha.png") == (1570, 530)
    assert png_size(rep / "embeddings-beta.png") == (1120, 530)
    # confusion: 4.5-inch squares (few classes) + 0.8 inch of colour bar; student + teacher
    # for alpha, the teacher alone for beta
    assert png_size(rep / "confusion-alpha.png") == (980, 530)
    assert png_size(rep / "confusion-beta.png") == (530, 530)
    md = (rep / "results.md").read_text()
    for name in ("alpha", "beta"):
        assert f"![embeddings of {name}](embeddings-{name}.png)" in md
        assert f"![confusion matrices of {name}](confusion-{name}.png)" in md
    assert md.count("## Figures") == 1
    # eval stays read-only towards the stages: nothing but reports/ changed
    after = {k: v for k, v in tree_snapshot(ws).items() if not k.startswith("reports")}
    assert after == before
    assert not list(rep.glob("*.tmp"))

    # the same seed draws the same pictures, byte for byte
    first = {p.name: p.read_bytes() for p in rep.glob("*.png")}
    code, _, err = run(capsys, "eval", "--workdir", ws, "--plots", *LOCAL)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in rep.glob("*.png")} == first
    assert (rep / "results.md").read_text().count("## Figures") == 1


@torch.no_grad()
def _reference(ws: Workspace, name: str, model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre-logits, predictions and labels of the test split, computed in float64 with a
    copy of the model, one image at a time."""
    m = copy.deepcopy(model).double().eval()
    test = dataset_of(ws, name).load("test")
    feats, preds, labels = [], [], []
    for b in pipeline_for(ws, CPU, name, "test", input_spec(ws, name), eval_order(len(test)),
                          7):
        for x, y in zip(b.images.double(), b.labels):
            pooled = m.forward_features(x[None])
            feats.append(m.forward_head(pooled, pre_logits=True)[0].numpy())
            preds.append(int(m.forward_head(pooled)[0].argmax()))
            labels.append(int(y))
    return np.stack(feats), np.array(preds), np.array(labels)


def test_projection_input_is_each_models_penultimate_features(ws):
    w = Workspace.open(ws)
    inputs = plot_inputs(w, CPU, "alpha", max_points=12)  # 24 test images, 3 classes
    assert [p.model for p in inputs.panels] == ["teacher", "joint", "student"]
    assert inputs.missing == []
    test_labels = np.asarray(dataset_of(w, "alpha").load("test").labels)
    # stratified: 4 of each class, the same rows for every model
    assert np.bincount(test_labels[inputs.rows]).tolist() == [4, 4, 4]
    assert np.array_equal(inputs.rows, stratified_rows(test_labels, 12, w.exp.seed))
    by = {p.model: p for p in inputs.panels}
    models = {"teacher": load_teacher(w, "alpha", CPU.device)[0].model,
              "student": load_student(w, "alpha", 2, CPU.device)}
    for kind, model in models.items():
        feats, preds, labels = _reference(w, "alpha", model)
        p = by[kind]
        assert p.features.shape == (12, feats.shape[1])
        np.testing.assert_allclose(p.features, feats[inputs.rows], rtol=1e-4, atol=1e-5)
        assert np.array_equal(p.labels, labels[inputs.rows])
        # the confusion matrix: counts from the float64 predictions, by hand
        expected = np.zeros((3, 3), dtype=np.int64)
        np.add.at(expected, (labels, preds), 1)
        assert np.array_equal(confusion_counts(p.y_true, p.y_pred, 3), expected)

    # the joint teacher: its fused L1 embedding of the cached teacher features (view 0)
    joint, _ = load_joint(w, 2, CPU.device)
    joint = joint.double()
    cached, labels = load_teacher_inputs(w, 2, "alpha", "test")
    ref = joint([f[:, 0].double() for f in cached])[0].numpy()
    np.testing.assert_allclose(by["joint"].features, ref[inputs.rows], rtol=1e-4, atol=1e-5)
    assert np.array_equal(by["joint"].labels, labels[inputs.rows])


def test_confusion_counts_match_eval_top1(ws, capsys):
    code, out, err = run(capsys, "eval", "--workdir", ws, "--json", *LOCAL)
    assert code == 0, err
    top1 = {(r["dataset"], r["model"]): r["top1"] for r in json.loads(out)["rows"]}
    inputs = plot_inputs(Workspace.open(ws), CPU, "alpha")
    for p in (p for p in inputs.panels if p.y_pred is not None):
        counts = confusion_counts(p.y_true, p.y_pred, 3)
        assert counts.sum() == 24
        assert abs(np.trace(counts) / 24 - top1[("alpha", p.model)]) < 1e-9


def test_tsne_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    feats = rng.normal(size=(120, 80)) + 4 * rng.normal(size=(4, 80))[labels]
    a, b = project(feats, 3), project(feats, 3)
    assert a.shape == (120, 2)
    assert np.array_equal(a, b)
    # PCA initialisation leaves t-SNE nothing random: the seed picks the sampled rows
    # (stratified_rows), not the map of given rows
    assert np.array_equal(a, project(feats, 4))
    # row i of the map is point i: four separated clusters stay apart (nearest neighbour
    # in 2-D has the same class)
    d = ((a[:, None] - a[None]) ** 2).sum(-1) + np.diag(np.full(120, np.inf))
    assert (labels[d.argmin(1)] == labels).mean() > 0.95


def test_stratified_rows_by_hand():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    rows = stratified_rows(labels, 12, seed=5)
    assert np.bincount(labels[rows]).tolist() == [4, 3, 4]  # 12 // 3 each, all of class 1
    assert np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, stratified_rows(labels, 12, seed=5))
    assert np.array_equal(stratified_rows(labels, 20, seed=5), np.arange(20))


def test_plots_without_scikit_learn_is_one_line(ws, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    line = bad(capsys, "eval", "--workdir", ws, "--plots", *LOCAL)
    assert "--plots needs scikit-learn" in line and "mlfd[plots]" in line
    assert not (ws / "reports" / "embeddings-alpha.png").exists()
