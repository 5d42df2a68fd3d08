"""Training budgets (issue 22 §1): equal images for small datasets, explicit images/steps,
presets as written, per-model budgets in the dry run."""

import math

import pytest
from helpers import LOCAL, bad, make_npz, run

from mlfd.config import DatasetEntry, Experiment
from mlfd.engine.budget import budget, rule_of
from mlfd.errors import MlfdError
from mlfd.presets import get_preset


def _custom(**teach):
    exp = Experiment(preset="custom", datasets=[DatasetEntry("small", "small.npz", "test_vit"),
                                                DatasetEntry("big", "big.npz", "test_vit")])
    for k, v in teach.items():
        setattr(exp.teach, k, v)
    return exp


SIZES = {"small": 150, "big": 1500}


def test_a_small_dataset_sees_as_many_images_as_the_baselines_show_it():
    exp = _custom()
    assert rule_of(exp) == "equal-images"
    b = budget(exp, "teach", "small", exp.stage("teach", "small"), SIZES)
    # by hand: the baselines make 10 passes over the largest dataset (1,500 images), each
    # step a batch of every dataset: 15,000 images of each; 150 images -> 100 epochs. The
    # floor of 8 steps per epoch caps the batch at ceil(150 / 8) = 19 images.
    assert (b.epochs, b.batch_size, b.steps_per_epoch) == (100, 19, 8)
    assert b.steps == 800 and b.images == 15000 and b.steps_per_epoch > 2
    big = budget(exp, "teach", "big", exp.stage("teach", "big"), SIZES)
    assert (big.epochs, big.batch_size, big.steps_per_epoch) == (10, 128, math.ceil(1500 / 128))
    student = budget(exp, "distill", "small", exp.stage("distill", "small"), SIZES)
    assert student.images == 15000


def test_the_joint_teacher_can_set_the_floor_too():
    exp = _custom()
    exp.fuse.epochs = 30  # shows each image 30 times: more than the baselines' 10 passes
    b = budget(exp, "teach", "big", exp.stage("teach", "big"), SIZES)
    assert b.epochs == 30


def test_explicit_images_or_steps_size_a_section():
    exp = _custom(images=3000)
    assert budget(exp, "teach", "small", exp.teach, SIZES).epochs == 20  # 3000 / 150
    exp = _custom(steps=100)
    exp.budget = "fixed"
    b = budget(exp, "teach", "big", exp.teach, SIZES)
    assert b.epochs == math.ceil(100 / math.ceil(1500 / 128)) and b.why == "teach.steps"
    with pytest.raises(MlfdError, match="images or steps, not both"):
        _custom(images=1, steps=1).validate()


def test_presets_keep_their_values_and_their_files():
    for name in ("demo", "trio"):
        exp = get_preset(name)
        assert rule_of(exp) == "fixed"
        for e in exp.datasets:
            cfg = exp.stage("teach", e.name)
            b = budget(exp, "teach", e.name, cfg, {d.name: 1000 for d in exp.datasets})
            assert (b.epochs, b.batch_size) == (cfg.epochs, cfg.batch_size)
        d = exp.to_dict()  # files and recipe digests read as before the budget keys
        assert "budget" not in d
        assert not {"images", "steps"} & (set(d["teach"]) | set(d["distill"]) | set(d["fuse"]))
    assert get_preset("trio").entry("animal-mnist").teach["epochs"] == 15


def test_unknown_rule_is_one_line(tmp_path, capsys):
    a = make_npz(tmp_path / "a.npz", 0)
    b = make_npz(tmp_path / "b.npz", 1)
    w = tmp_path / "w"
    code, _, err = run(capsys, "teach", "--teacher", f"{a}=test_vit", "--teacher",
                       f"{b}=test_vit", "--workdir", w, "--dry-run", *LOCAL)
    assert code == 0, err
    text = (w / "experiment.yaml").read_text() if (w / "experiment.yaml").exists() else None
    assert text is None  # a dry run writes nothing
    exp = Experiment(preset="custom", budget="more",
                     datasets=[DatasetEntry("a", str(a), "test_vit"),
                               DatasetEntry("b", str(b), "test_vit")])
    w.mkdir()
    exp.save(w / "experiment.yaml")
    line = bad(capsys, "teach", "--workdir", w, "--dry-run", *LOCAL)
    assert "budget 'more': choose fixed, equal-images" in line


def test_dry_run_prints_each_model_budget(tmp_path, capsys):
    small = make_npz(tmp_path / "small.npz", 0, classes=2, n_train=150, n_test=10)
    big = make_npz(tmp_path / "big.npz", 1, classes=3, n_train=1500, n_test=10)
    code, out, err = run(capsys, "distill", "--teacher", f"{small}=test_vit", "--teacher",
                         f"{big}=test_vit", "--dataset", "all", "--levels", 1, "--workdir",
                         tmp_path / "w", "--input-size", 32, "--dry-run", *LOCAL)
    assert code == 0, err
    assert "budget rule 'equal-images'" in out
    assert "teacher small: 100 epochs x 8 steps of 19 = 800 steps, 15000 images" in out
    assert "student small: 100 epochs x 8 steps of 19 = 800 steps, 15000 images" in out
    assert f"teacher big: 10 epochs x {math.ceil(1500 / 128)} steps of 128" in out
    assert not (tmp_path / "w").exists()
