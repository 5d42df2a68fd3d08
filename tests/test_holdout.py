"""A validation split held out of train: recipes are chosen on it, never on the test split."""

import json

import numpy as np
import pytest
import yaml
from helpers import ARCHS, TINY, bad, make_npz, run

from mlfd.data.datasets import Dataset, Split, holdout_indices, with_holdout
from mlfd.errors import MlfdError


def test_holdout_indices_by_hand():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)
    idx = holdout_indices(labels, 0.2)
    # round(0.2 * n_c): 2 of class 0, 1 of class 1; a lone image stays in train; a class of
    # two gives one (at least one, never all).
    assert np.bincount(labels[idx], minlength=4).tolist() == [2, 1, 0, 1]
    assert (np.diff(idx) > 0).all()
    assert np.array_equal(idx, holdout_indices(labels, 0.2))  # a fixed draw
    assert not np.array_equal(holdout_indices(labels, 0.2), holdout_indices(labels, 0.2, seed=1))


def _dataset(n=48, classes=4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(n) % classes
    reads = []

    def load(split):
        reads.append(split)
        if split == "test":
            raise AssertionError("the real test split must not be read")
        return Split(labels=labels, images=images)

    ds = Dataset(name="d", classes=[str(c) for c in range(classes)], channels=1,
                 image_size=(8, 8), mean=(0.5,), std=(0.25,), source="d", license="-",
                 loader=load, fingerprinter=lambda: "base")
    return ds, images, labels, reads


def test_with_holdout_partitions_train_and_never_reads_test():
    ds, images, labels, reads = _dataset()
    held = with_holdout(ds, 0.25)
    train, val = held.load("train"), held.load("test")
    assert (len(train), len(val)) == (36, 12)  # round(0.25 * 12) = 3 per class
    # every original row lands in exactly one part, with its own label
    rows = {images[i].tobytes(): labels[i] for i in range(len(labels))}
    seen = [x.tobytes() for x in np.concatenate([train.images, val.images])]
    assert sorted(seen) == sorted(rows)
    for part in (train, val):
        assert all(rows[x.tobytes()] == y for x, y in zip(part.images, part.labels, strict=True))
    assert np.bincount(val.labels).tolist() == [3, 3, 3, 3]
    assert reads == ["train"]
    assert held.fingerprint() not in ("base", with_holdout(ds, 0.2).fingerprint())
    assert held.fingerprint() == with_holdout(ds, 0.25).fingerprint()
    with pytest.raises(MlfdError, match="between 0 and 1"):
        with_holdout(ds, 1.0)


def test_experiment_holdout_is_checked():
    from mlfd.presets import get_preset

    exp = get_preset("demo")
    exp.holdout = 0.1
    exp.validate()
    exp.holdout = 1.0
    with pytest.raises(MlfdError, match=r"holdout must be a fraction in \[0, 1\)"):
        exp.validate()


def test_cli_trains_and_measures_on_the_holdout(tmp_path, capsys):
    a, b = make_npz(tmp_path / "alpha.npz", 0), make_npz(tmp_path / "beta.npz", 1, classes=4)
    w = tmp_path / "ws"
    teachers = ["--teacher", f"{a}={ARCHS[0]}", "--teacher", f"{b}={ARCHS[1]}"]
    code, out, err = run(capsys, "teach", "--workdir", w, *teachers, "--holdout", 0.25,
                         "--json", *TINY)
    assert code == 0, err
    assert yaml.safe_load((w / "experiment.yaml").read_text())["holdout"] == 0.25
    code, out, err = run(capsys, "eval", "--workdir", w, "--json", "--device", "cpu")
    assert code == 0, err
    doc = json.loads(out)
    rows = {r["dataset"]: r for r in doc["rows"]}
    # 48 training images of 3 / 4 classes: 4 / 3 of each class are held out; the npz's
    # own 24 test images are not what is measured
    assert (rows["alpha"]["n"], rows["beta"]["n"]) == (12, 12)
    assert rows["alpha"]["split"] == "holdout 0.25 of train"
    assert "holdout 0.25 of train" in err  # the table's title says it too
    with open(doc["reports"]["markdown"]) as f:
        assert f.read().startswith("Measured on the holdout 0.25 of train, not on the test")
    # another fraction on the same workdir is refused before anything is written
    line = bad(capsys, "teach", "--workdir", w, "--holdout", 0.5, *TINY)
    assert "already holds an experiment with holdout 0.25" in line
    assert "holdout" in bad(capsys, "teach", "--workdir", tmp_path / "new", *teachers,
                            "--holdout", 1.5, *TINY)
    assert not (tmp_path / "new").exists()
