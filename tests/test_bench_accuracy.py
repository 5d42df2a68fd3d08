"""bench/accuracy.py: mean ± std over seeds, only complete results, same-arch baselines."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "accuracy", Path(__file__).resolve().parents[1] / "bench" / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(accuracy)


def _row(dataset, model, top1, arch="a", levels=None, status="complete", top5=None):
    return dict(dataset=dataset, model=model, arch=arch, levels=levels, status=status,
                top1=top1, top5=top5)


def test_aggregate_by_hand():
    seeds = [
        {"rows": [_row("d", "teacher", 0.50), _row("d", "student", 0.60, levels=2, top5=0.9),
                  _row("d", "multi-head", 0.40, arch="a"), _row("d", "multi-head", 0.1, arch="b"),
                  _row("d", "student", None, levels=1, status="incomplete")]},
        {"rows": [_row("d", "teacher", 0.54), _row("d", "student", 0.64, levels=2, top5=0.8),
                  _row("d", "multi-head", 0.44, arch="a"),
                  _row("d", "student", 0.99, levels=1, status="stale")]},
    ]
    agg = accuracy.aggregate(seeds)["d"]
    assert agg["teacher (a)"]["top1_mean"] == pytest.approx(52.0)
    # sample std of (50, 54) = sqrt(((-2)^2 + 2^2) / 1) = 2.828...
    assert agg["teacher (a)"]["top1_std"] == pytest.approx(8 ** 0.5)
    assert agg["student L2"]["top5_mean"] == pytest.approx(85.0)
    assert agg["multi-head (b)"]["n_seeds"] == 1 and agg["multi-head (b)"]["top1_std"] == 0.0
    assert "student L1" not in agg  # neither incomplete nor stale results count
    table = accuracy.markdown({"d": agg}, seeds, [2])
    assert "| MLFD student L2 | 62.00 ± 2.83 |" in table
    assert "| multi-head (same arch) | 42.00 ± 2.83 |" in table  # arch a, not b
    assert "| joint-head (same arch) | — |" in table
    seeds[0]["rows"].append(_row("d", "joint-head", 0.3))  # in one of the two seeds only
    table = accuracy.markdown({"d": accuracy.aggregate(seeds)["d"]}, seeds, [2])
    assert "| joint-head (same arch) | 30.00 (n=1) |" in table


def test_set_values_change_the_preset_where_they_say():
    from mlfd.presets import get_preset

    exp = get_preset("trio")
    accuracy.set_value(exp, "datasets.animal-mnist.teach.epochs=12")
    accuracy.set_value(exp, "distill.lr=5e-4")
    assert exp.stage("teach", "animal-mnist").epochs == 12
    assert exp.stage("teach", "mnist").epochs == 2  # the other datasets keep the section's
    assert exp.distill.lr == 5e-4 and isinstance(exp.distill.lr, float)
    for wrong in ("distill.nope=1", "datasets.mnist.fuse.epochs=1", "distill.lr"):
        with pytest.raises(SystemExit):
            accuracy.set_value(exp, wrong)


def test_include_takes_only_seeds_of_the_same_experiment(tmp_path):
    import argparse
    import json

    earlier = tmp_path / "earlier.json"
    per_seed = [{"seed": 0, "rows": [_row("d", "teacher", 0.5)], "seconds": {}},
                {"seed": 1, "rows": [_row("d", "teacher", 0.7)], "seconds": {}}]
    earlier.write_text(json.dumps({"preset": "trio", "levels": [1, 2], "per_seed": per_seed}))
    args = argparse.Namespace(include=[earlier], preset="trio", levels=[1, 2], holdout=0.0,
                              set=[], seeds=[1, 2], recipe="r1")
    kept, wall = accuracy.include(args)
    assert [s["seed"] for s in kept] == [0] and kept[0]["included_from"] == "earlier.json"
    later = tmp_path / "later.json"
    later.write_text(json.dumps({"preset": "trio", "levels": [1, 2], "wall_seconds": 7.5,
                                 "per_seed": [dict(per_seed[1], seed=2)]}))
    kept, wall = accuracy.include(argparse.Namespace(**{**vars(args), "seeds": [],
                                                        "include": [later, earlier]}))
    assert [s["seed"] for s in kept] == [0, 1, 2] and wall == 7.5
    # a seed in two files: the later file's rows, the earlier stage times kept beside them
    resumed = tmp_path / "resumed.json"
    resumed.write_text(json.dumps({"preset": "trio", "levels": [1, 2], "per_seed": [
        {"seed": 1, "rows": [_row("d", "teacher", 0.9)], "seconds": {"b": 2}}]}))
    per_seed[1]["seconds"] = {"a": 1}
    earlier.write_text(json.dumps({"preset": "trio", "levels": [1, 2], "per_seed": per_seed}))
    kept, _ = accuracy.include(argparse.Namespace(**{**vars(args), "seeds": [],
                                                     "include": [earlier, resumed]}))
    one = [s for s in kept if s["seed"] == 1]
    assert len(one) == 1 and one[0]["rows"][0]["top1"] == 0.9
    assert one[0]["seconds"] == {"b": 2} and one[0]["earlier_seconds"] == [{"a": 1}]
    assert one[0]["included_from"] == "earlier.json, resumed.json"
    for other in ({"holdout": 0.1}, {"levels": [2]}):
        with pytest.raises(SystemExit, match="another experiment"):
            accuracy.include(argparse.Namespace(**{**vars(args), **other}))
    with pytest.raises(SystemExit, match="no seed"):
        accuracy.include(argparse.Namespace(**{**vars(args), "seeds": [0, 1]}))


def test_each_variant_has_its_own_workdir_and_log(tmp_path):
    import argparse

    a = argparse.Namespace(work=tmp_path, name="trio-holdout0.1")
    b = argparse.Namespace(work=tmp_path, name="trio-holdout0.1-equal-images")
    (wa, la), (wb, lb) = accuracy.workdir(a, 0), accuracy.workdir(b, 0)
    assert (wa.name, la.name) == ("trio-holdout0.1-seed0", "trio-holdout0.1-seed0.log")
    assert wb != wa and lb.name == "trio-holdout0.1-equal-images-seed0.log"


def test_a_changed_recipe_is_never_merged(tmp_path):
    import argparse
    import json

    args = argparse.Namespace(preset="trio", levels=[1, 2], holdout=0.0, set=[], seeds=[1])
    plain = accuracy.recipe(args)
    # the same experiment spelled as --set values has the same recipe; another value not
    same = argparse.Namespace(**{**vars(args), "set": ["distill.epochs=2"]})
    other = argparse.Namespace(**{**vars(args), "set": ["datasets.animal-mnist.teach.epochs=12"]})
    assert accuracy.recipe(same) == plain != accuracy.recipe(other)
    assert accuracy.recipe(argparse.Namespace(**{**vars(args), "seeds": [5]})) == plain
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"preset": "trio", "levels": [1, 2], "recipe": plain,
                             "per_seed": [{"seed": 0, "rows": [_row("d", "teacher", 0.5)],
                                           "seconds": {}}]}))
    ok = argparse.Namespace(**{**vars(args), "include": [f], "recipe": plain})
    assert [s["seed"] for s in accuracy.include(ok)[0]] == [0]
    with pytest.raises(SystemExit, match="another experiment"):
        accuracy.include(argparse.Namespace(**{**vars(ok), "recipe": accuracy.recipe(other)}))


def test_a_dataset_values_dict_can_be_set_whole():
    from mlfd.presets import get_preset

    exp = get_preset("trio")
    assert exp.stage("teach", "animal-mnist").epochs == 15
    accuracy.set_value(exp, "datasets.animal-mnist.teach={}")  # the preset before 07768bf
    assert exp.stage("teach", "animal-mnist").epochs == 2 == exp.teach.epochs
    assert exp.stage("distill", "animal-mnist").epochs == 15  # the other section untouched
    with pytest.raises(SystemExit, match="expected"):
        accuracy.set_value(exp, "datasets.animal-mnist.teach=3")


def test_baseline_recipe_changes_only_with_what_baselines_train_on():
    import argparse

    def digests(*values):
        a = argparse.Namespace(preset="trio", levels=[1, 2], holdout=0.0, set=list(values))
        return accuracy.recipe(a), accuracy.baseline_recipe(a)

    plain = digests()
    # a dataset's own epochs: the students and teachers change, a baseline's epoch is a pass
    # over the largest dataset at the section's count, so the baselines do not
    for same in (["datasets.animal-mnist.teach={}", "datasets.animal-mnist.distill={}"],
                 ["distill.epochs=3"], ["fuse.lr=0.01"]):
        r, b = digests(*same)
        assert r != plain[0] and b == plain[1], same
    for other in (["teach.epochs=3"], ["datasets.animal-mnist.teach.lr=0.01"],
                  ["teach.weight_decay=0.1"]):
        r, b = digests(*other)
        assert r != plain[0] and b != plain[1], other


def test_include_takes_baselines_from_a_file_whose_baselines_match(tmp_path):
    import argparse
    import json

    def doc(recipe, baseline_recipe, per_seed):
        return json.dumps({"preset": "trio", "levels": [1, 2], "recipe": recipe,
                           "baseline_recipe": baseline_recipe, "per_seed": per_seed})

    old = tmp_path / "old.json"  # another recipe, the same baselines: seeds 0 and 1
    old.write_text(doc("r0", "b", [
        {"seed": s, "rows": [_row("d", "teacher", 0.1), _row("d", "multi-head", 0.4 + s / 10)],
         "seconds": {"distill-L1": 9, "multi-head-a": 5 + s}} for s in (0, 1)]))
    models = tmp_path / "models.json"  # this recipe, models only, seeds 0-2
    models.write_text(doc("r1", "b", [
        {"seed": s, "rows": [_row("d", "teacher", 0.9), _row("d", "student", 0.95, levels=1)],
         "seconds": {"distill-L1": 3}} for s in (0, 1, 2)]))
    args = argparse.Namespace(include=[old, models], preset="trio", levels=[1, 2],
                              holdout=0.0, seeds=[], recipe="r1", baseline_recipe="b")
    kept, _ = accuracy.include(args)
    assert [s["seed"] for s in kept] == [0, 1, 2]
    s0 = kept[0]
    # the old recipe's teacher (0.1) never enters; its baselines do
    assert sorted((r["model"], r["top1"]) for r in s0["rows"]) == [
        ("multi-head", 0.4), ("student", 0.95), ("teacher", 0.9)]
    assert s0["seconds"] == {"distill-L1": 3, "multi-head-a": 5}
    assert s0["parts"] == ["models", "baselines"] and kept[2]["parts"] == ["models"]
    assert s0["included_from"] == "old.json, models.json"
    # models run now without baselines: the included baselines complete those seeds
    now = argparse.Namespace(**{**vars(args), "include": [old], "seeds": [1], "baselines": False})
    inc, _ = accuracy.include(now)
    assert [(s["seed"], s["parts"]) for s in inc] == [(0, ["baselines"]), (1, ["baselines"])]
    ran = [{"seed": 1, "rows": [_row("d", "teacher", 0.8), _row("d", "multi-head", 0.0)],
            "seconds": {}}]
    merged = accuracy.combine(inc, ran)
    one = next(s for s in merged if s["seed"] == 1)
    # the run's own baseline row (a leftover in its workdir) gives way to the included part
    assert sorted((r["model"], r["top1"]) for r in one["rows"]) == [
        ("multi-head", 0.5), ("teacher", 0.8)]
    assert accuracy.aggregate(merged)["d"]["multi-head (a)"]["per_seed_top1"] == [40.0, 50.0]
    # baselines run now as well: nothing of the old file is left to take
    with pytest.raises(SystemExit, match="no seed"):
        accuracy.include(argparse.Namespace(**{**vars(now), "seeds": [0, 1],
                                               "baselines": True}))
    # neither the recipe nor the baselines' recipe: refused
    with pytest.raises(SystemExit, match="another experiment"):
        accuracy.include(argparse.Namespace(**{**vars(args), "baseline_recipe": "c"}))
