"""`mlfd compare` (issue 22 §4): seeds x levels x baselines, mean ± sample std."""

import json
import statistics

import pytest
import yaml
from helpers import bad, make_npz, run

from mlfd.report import aggregate, spread_verdicts

TINY_RUN = ["--input-size", 32, "--epochs", 1, "--batch-size", 16, "--device", "cpu",
            "--pipeline", "torch"]


def test_compare_two_seeds_writes_mean_std_and_per_seed_values(tmp_path, capsys):
    a = make_npz(tmp_path / "a.npz", 0, classes=2, n_train=32, n_test=16)
    b = make_npz(tmp_path / "b.npz", 1, classes=3, n_train=48, n_test=18)
    w = tmp_path / "w"
    args = ["compare", "--teacher", f"{a}=test_resnet", "--teacher", f"{b}=test_resnet",
            "--workdir", w, "--seeds", 0, 1, "--levels", 1, "--baselines", "none",
            "--set", "distill.temperature=3", *TINY_RUN]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    doc = json.loads((w / "reports" / "compare.json").read_text())
    assert doc["seeds"] == [0, 1] and doc["levels"] == [1]
    # each seed in its own workdir under the experiment's
    for s in (0, 1):
        assert (w / "compare" / f"seed-{s}" / "teachers" / "a" / "last.safetensors").exists()
        assert (w / "compare" / f"seed-{s}" / "students" / "b" / "L1").is_dir()
        # --set reaches every seed's experiment
        seed_exp = yaml.safe_load((w / "compare" / f"seed-{s}" / "experiment.yaml").read_text())
        assert seed_exp["distill"]["temperature"] == 3 and seed_exp["seed"] == s
    agg = {(x["dataset"], x["model"], x["levels"]): x for x in doc["aggregate"]}
    for key in [("a", "teacher", None), ("b", "student", 1), ("a", "joint", 1)]:
        x = agg[key]
        # against the per-seed evaluation rows, recomputed here
        top1 = [r["top1"] for d in doc["per_seed"] for r in d["rows"]
                if (r["dataset"], r["model"], r["levels"]) == key]
        assert len(top1) == 2
        assert abs(x["mean"] - statistics.fmean(top1)) < 1e-12
        assert abs(x["std"] - statistics.stdev(top1)) < 1e-12
        assert sorted(x["per_seed"].values()) == sorted(top1)
    md = (w / "reports" / "compare.md").read_text()
    teacher = agg[("a", "teacher", None)]
    line = next(x for x in md.splitlines() if x.startswith("| a | dataset-specific teacher"))
    assert f"{100 * teacher['mean']:.2f} ± {100 * teacher['std']:.2f}" in line
    assert f"{100 * teacher['per_seed']['0']:.2f}" in line
    assert "seed 0 | seed 1" in md
    assert (w / "reports" / "compare.png").stat().st_size > 0
    assert "mean ± std" in out and "student L1 vs teacher" in out

    # a second run reuses both seeds: nothing is trained again
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "epoch 1/" not in err
    assert json.loads((w / "reports" / "compare.json").read_text())["aggregate"] == \
        doc["aggregate"]


def test_spread_verdicts_by_hand():
    rows = lambda t, s: [{"dataset": "d", "model": "teacher", "arch": "x", "levels": None,  # noqa
                          "top1": t, "status": "complete"},
                         {"dataset": "d", "model": "student", "arch": "x", "levels": 1,
                          "top1": s, "status": "complete"},
                         {"dataset": "d", "model": "multi-head", "arch": "y", "levels": None,
                          "top1": 0.1, "status": "complete"}]
    per_seed = [{"seed": 0, "rows": rows(0.50, 0.60)}, {"seed": 1, "rows": rows(0.52, 0.62)},
                {"seed": 2, "rows": rows(0.54, 0.64)}]
    agg = aggregate(per_seed, ["d"], "same-arch")
    assert {a["model"] for a in agg} == {"teacher", "student"}  # other arch's baseline: out
    assert len(aggregate(per_seed, ["d"], "all")) == 3
    # student 0.62 ± 0.02 vs teacher 0.52 ± 0.02: +10 points, beyond the 4-point spread
    assert spread_verdicts(agg) == ["d: student L1 vs teacher: +10.00 points, exceeds the "
                                    "spread (4.00)"]


def test_bad_baselines_is_one_line(tmp_path, capsys):
    line = bad(capsys, "compare", "--preset", "demo", "--workdir", tmp_path / "w",
               "--baselines", "some")
    assert "--baselines 'some': choose same-arch, all, none" in line


def test_a_joint_teacher_below_the_teacher_is_named_once_per_dataset_and_level():
    from mlfd.report import markdown, weaker_joint_lines

    def row(dataset, model, top1, levels=None):
        return {"dataset": dataset, "model": model, "arch": "x", "levels": levels,
                "top1": top1, "top5": None, "status": "complete", "split": "test"}

    rows = [row("a", "teacher", 0.80), row("a", "joint", 0.75, 1), row("a", "joint", 0.85, 2),
            row("b", "teacher", 0.60), row("b", "joint", 0.70, 1)]
    lines = weaker_joint_lines(rows)
    assert lines == ["a: the joint teacher L1 (75.00 %) is below a's own teacher (80.00 %) on "
                     "the test: its students are not expected to beat the teacher"]
    assert f"- {lines[0]}" in markdown(rows)


def test_set_values_change_the_experiment_where_they_say():
    from mlfd.errors import MlfdError
    from mlfd.presets import get_preset
    from mlfd.stages.compare import apply_settings

    exp = get_preset("trio")
    assert exp.stage("teach", "animal-mnist").epochs == 15
    new = apply_settings(exp, ["datasets.animal-mnist.teach.epochs=12", "distill.lr=5e-4",
                               "budget=fixed", "cache.views=2"])
    assert new.stage("teach", "animal-mnist").epochs == 12
    assert new.stage("teach", "mnist").epochs == 2  # the other datasets keep the section's
    assert new.distill.lr == 5e-4 and isinstance(new.distill.lr, float)
    assert (new.budget, new.cache.views) == ("fixed", 2)
    assert exp.stage("teach", "animal-mnist").epochs == 15 and exp.distill.lr != 5e-4
    # a dataset's values replaced whole: {} is the section's (trio before 07768bf)
    whole = apply_settings(exp, ["datasets.animal-mnist.teach={}"])
    assert whole.stage("teach", "animal-mnist").epochs == 2 == whole.teach.epochs
    assert whole.stage("distill", "animal-mnist").epochs == 15  # the other section untouched
    for wrong, says in (("distill.nope=1", "distill.nope: unknown key"),
                        ("datasets.mnist.fuse.epochs=1", "datasets.mnist.fuse is not a section"),
                        ("distill.lr", "expected KEY=VALUE"),
                        ("datasets.animal-mnist.teach=3", "expected a mapping, got 3"),
                        ("distill.epochs=0", "distill.epochs: expected an integer >= 1"),
                        ("datasets.mnist.teach.nope=1", "unknown key(s) nope"),
                        ("datasets.zzz.teach.epochs=1", "'zzz' is not part of this experiment"),
                        ("seed=3", "set it with --seeds"),
                        ("budget=sometimes", "choose fixed, equal-images")):
        with pytest.raises(MlfdError, match="^--set ") as e:
            apply_settings(exp, [wrong])
        assert says in str(e.value), (wrong, str(e.value))


def test_bad_set_is_one_line_and_writes_nothing(tmp_path, capsys):
    line = bad(capsys, "compare", "--preset", "demo", "--workdir", tmp_path / "w",
               "--set", "teach.epochz=3")
    assert "--set teach.epochz=3: teach.epochz: unknown key (did you mean 'epochs'?)" in line
    assert not (tmp_path / "w").exists()
