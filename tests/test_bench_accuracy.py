"""bench/accuracy.py: a thin caller of `mlfd compare`, its results named and described."""

import datetime as dt
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import yaml
from helpers import make_npz, run

BENCH = Path(__file__).resolve().parents[1] / "bench"
spec = importlib.util.spec_from_file_location("accuracy", BENCH / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(accuracy)

TINY = ["--input-size", "32", "--epochs", "1", "--batch-size", "16", "--pipeline", "torch"]


def test_two_seeds_mean_std_and_per_seed_values_are_the_seeds_own_eval(tmp_path, capsys):
    a = make_npz(tmp_path / "a.npz", 0, classes=2, n_train=32, n_test=16)
    b = make_npz(tmp_path / "b.npz", 1, classes=3, n_train=48, n_test=18)
    results_before = sorted(p.name for p in (BENCH / "results").iterdir())
    # an earlier run's file in the variant's workdir (another --set): the command wins
    stale = tmp_path / "root" / "custom-t" / "experiment.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text(yaml.safe_dump({"datasets": [
        {"name": n, "source": str(p), "arch": "test_resnet", "input_size": 32}
        for n, p in (("a", a), ("b", b))], "distill": {"soft_weight": 0.1}}))
    argv = ["--teacher", f"{a}=test_resnet", "--teacher", f"{b}=test_resnet",
            "--seeds", "0", "1", "--levels", "1", "--device", "cpu", "--tag", "t",
            "--no-baselines", "--set", "distill.temperature=3", "--root", str(tmp_path / "root"),
            "--out", str(tmp_path / "res"), "--", *TINY]
    doc = accuracy.main(argv)
    capsys.readouterr()
    today = dt.date.today().isoformat()
    out = tmp_path / "res" / f"accuracy-custom-t-{today}.json"
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc, default=str))
    assert doc["seeds"] == [0, 1] and doc["levels"] == [1] and doc["date"] == today
    assert doc["machine"]["cores"] >= 1 and doc["versions"]["torch"]
    assert doc["command"].startswith("python bench/accuracy.py --teacher")
    assert "--set distill.temperature=3" in doc["compare_command"]
    assert doc["experiment"]["distill"]["temperature"] == 3
    assert doc["experiment"]["distill"]["soft_weight"] == 0.6  # the default, not the file's

    # every number against what `mlfd eval` reports in that seed's own workdir
    evals = {}
    for s in (0, 1):
        seed_dir = tmp_path / "root" / "custom-t" / "compare" / f"seed-{s}"
        on_disk = yaml.safe_load((seed_dir / "experiment.yaml").read_text())
        assert on_disk["seed"] == s and on_disk["distill"]["temperature"] == 3
        assert on_disk["distill"]["soft_weight"] == 0.6
        code, stdout, err = run(capsys, "eval", "--workdir", seed_dir, "--json", "--device",
                                "cpu", "--pipeline", "torch")
        assert code == 0, err
        evals[s] = {(r["dataset"], r["model"], r["arch"], r["levels"]): r["top1"]
                    for r in json.loads(stdout)["rows"]}
    agg = {(x["dataset"], x["model"], x["arch"], x["levels"]): x for x in doc["aggregate"]}
    assert {k[1] for k in agg} == {"teacher", "joint", "student"}
    assert {k[0] for k in agg} == {"a", "b"}
    md = out.with_suffix(".md").read_text()
    for key, x in agg.items():
        per_seed = [evals[0][key], evals[1][key]]
        assert [x["per_seed"][str(s)] for s in (0, 1)] == per_seed, key
        assert x["mean"] == pytest.approx(statistics.fmean(per_seed), abs=1e-12)
        assert x["std"] == pytest.approx(statistics.stdev(per_seed), abs=1e-12)
        assert f"{100 * x['mean']:.2f} ± {100 * x['std']:.2f} | " \
               f"{100 * per_seed[0]:.2f} | {100 * per_seed[1]:.2f} |" in md
    assert md.startswith(f"# Accuracy: custom-t, {today}") and doc["command"] in md
    # nothing was written into the checkout
    assert sorted(p.name for p in (BENCH / "results").iterdir()) == results_before


def test_names_and_where_results_go(tmp_path):
    today = "2026-12-07"
    args = accuracy.parse(["--preset", "trio", "--holdout", "0.1", "--tag", "x",
                           "--root", str(tmp_path)])
    name = accuracy.name_of(args)
    assert name == "trio-holdout0.1-x"
    assert accuracy.outputs(args, name, today)[0] == \
        tmp_path / "results" / f"accuracy-trio-holdout0.1-x-{today}.json"
    saved = accuracy.parse(["--save"])
    assert accuracy.outputs(saved, "demo", today) == (
        BENCH / "results" / f"accuracy-demo-{today}.json",
        BENCH / "results" / f"accuracy-demo-{today}.md")
    assert saved.preset == "demo" and saved.root == accuracy.default_root()
    one = accuracy.parse(["--out", str(tmp_path / "r.json")])
    assert accuracy.outputs(one, "demo", today)[1] == tmp_path / "r.md"
    custom = accuracy.parse(["--teacher", "a.npz=test_resnet", "--teacher", "b=test_vit"])
    assert custom.preset is None and accuracy.name_of(custom) == "custom"


def test_options_map_onto_compare(tmp_path):
    args = accuracy.parse(["--preset", "trio", "--seeds", "3", "4", "--levels", "2",
                           "--no-baselines", "--data-root", "/d", "--holdout", "0.1",
                           "--set", "a.b=1", "--set", "c=2", "--", "--epochs", "2"])
    cmd = accuracy.compare_argv(args, tmp_path / "w")
    assert cmd == ["compare", "--workdir", str(tmp_path / "w"), "--seeds", "3", "4",
                   "--levels", "2", "--baselines", "none", "--device", "auto",
                   "--preset", "trio", "--data-root", "/d", "--holdout", "0.1",
                   "--set", "a.b=1", "--set", "c=2", "--epochs", "2"]


def test_bad_input_is_one_error_line_and_writes_no_results(tmp_path, capsys):
    a = make_npz(tmp_path / "a.npz", 0, classes=2, n_train=32, n_test=16)
    b = make_npz(tmp_path / "b.npz", 1, classes=2, n_train=32, n_test=16)
    common = ["--teacher", f"{a}=test_resnet", "--teacher", f"{b}=test_resnet",
              "--root", str(tmp_path / "root"), "--out", str(tmp_path / "res")]
    for argv, says in ((["--set", "distill.nope=1"], "distill.nope: unknown key"),
                       (["--preset", "demo"], "either --preset or --teacher"),
                       (["--baselines", "some"], "invalid choice")):
        with pytest.raises(SystemExit) as e:
            accuracy.main(common + argv + ["--", *TINY])
        assert e.value.code == 2
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "res").exists()
