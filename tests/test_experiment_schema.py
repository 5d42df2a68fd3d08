"""experiment.yaml and the command-line values are checked against one schema (the config
dataclasses' annotations) before anything is written: one line naming the key, exit 2."""

import copy
import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import LOCAL, make_npz, run
from PIL import Image

from mlfd.config import DatasetEntry, Experiment, TrainConfig
from mlfd.errors import MlfdError
from mlfd.presets import PRESETS, get_preset


def refused(capsys, *args) -> str:
    """bad() with its exit code: exit 2, exactly one `error:` line, no traceback."""
    code, _, err = run(capsys, *args)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.fixture
def data(tmp_path):
    return make_npz(tmp_path / "alpha.npz", 0), make_npz(tmp_path / "beta.npz", 1)


def experiment(a, b) -> dict:
    """A valid, tiny experiment (what a test edits into an invalid one)."""
    exp = Experiment(datasets=[DatasetEntry("alpha", str(a), "test_resnet", 16),
                               DatasetEntry("beta", str(b), "test_vit", 16,
                                            model_kwargs={"img_size": 16})],
                     teach=TrainConfig(epochs=1, batch_size=16))
    exp.validate()
    return exp.to_dict()


def _set(path: str, value):
    """An edit of the experiment dict: ``datasets.1.teach.epochs`` = value."""
    def edit(d):
        *parents, last = path.split(".")
        for k in parents:
            d = d[int(k)] if k.isdigit() else d[k]
        d[int(last) if last.isdigit() else last] = value
    return edit


YAML_CASES = [
    # values that become path components (teachers/<name>, mlfd-runs/<preset>, ...)
    ("datasets.0.name", "../../../escape", "datasets[0].name: expected a name"),
    ("datasets.1.name", "a/b", "datasets[1].name: expected a name"),
    ("datasets.0.name", ".hidden", "datasets[0].name: expected a name"),
    ("datasets.0.name", "..", "datasets[0].name: expected a name"),
    ("datasets.1.arch", "../../x", "datasets[1].arch: expected a name"),
    ("preset", "../up", "preset: expected a name"),
    # a wrong type (each used to end in `internal error: TypeError`)
    ("teach.epochs", "ten", "teach.epochs: expected an integer >= 1, got 'ten'"),
    ("levels", "2", "levels: expected an integer >= 1, got '2'"),
    ("cache.views", "4", "cache.views: expected an integer >= 1, got '4'"),
    ("distill.soft_weight", "0.6", "distill.soft_weight: expected a finite number >= 0"),
    ("datasets.0.input_size", "32", "datasets[0].input_size: expected an integer >= 8"),
    ("holdout", "0.1", "holdout: expected a finite number, got '0.1'"),
    ("teach.label_smoothing", "0.1", "teach.label_smoothing: expected a number in [0, 1)"),
    ("fuse", [1, 2], "fuse: expected a mapping, got [1, 2]"),
    ("datasets.1.arch", 5, "datasets[1].arch: expected a name"),
    ("datasets.1.teach", ["lr"], "datasets[1].teach: expected a mapping"),
    ("distill.level_weights", [0.2, "x"], "distill.level_weights[1]: expected a finite number"),
    # accepted before, failing later or silently
    ("seed", 1.5, "seed: expected an integer in [0, 18446744073709551615], got 1.5"),
    ("datasets.0.hflip", "yes", "datasets[0].hflip: expected true or false, got 'yes'"),
    ("fuse.dropout", 1.0, "fuse.dropout: expected a number in [0, 1), got 1.0"),
    ("fuse.width", 0, "fuse.width: expected an integer >= 1, got 0"),
    ("teach.weight_decay", -0.1, "teach.weight_decay: expected a finite number >= 0"),
    ("teach.epochs", 2.5, "teach.epochs: expected an integer >= 1, got 2.5"),
    ("distill.epochs", True, "distill.epochs: expected an integer >= 1, got True"),
    ("teach.lr", float("inf"), "teach.lr: expected a finite number > 0, got inf"),
    ("teach.warmup_epochs", 2, "teach.warmup_epochs 2 is longer than the training "
                               "(teach.epochs 1)"),
    ("datasets.1.teach", {"epochs": "ten"},
     "datasets[1].teach.epochs: expected an integer >= 1, got 'ten'"),
    ("datasets.1.distill", {"temprature": 3},
     "datasets[beta].distill: unknown key(s) temprature (did you mean 'temperature'?)"),
    # unknown keys, with a hint
    ("teach.lrr", 0.1, "teach.lrr: unknown key (did you mean 'lr'?)"),
    ("dataset", [], "dataset: unknown key (did you mean 'datasets'?)"),
    ("datasets.0.model_kwargs", {"drop_rat": 0.1},
     "datasets[0].model_kwargs.drop_rat: unknown key: timm's test_resnet (ResNet) takes no "
     "such argument (did you mean 'drop_rate'?)"),
]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("key,value,expect", YAML_CASES,
                         ids=[f"{k}={v!r}"[:40] for k, v, _ in YAML_CASES])
def test_invalid_experiment_file_is_refused_before_anything_is_written(
        tmp_path, capsys, data, key, value, expect, dry_run):
    w = tmp_path / "runs" / "w"
    w.mkdir(parents=True)
    doc = experiment(*data)
    _set(key, value)(doc)
    (w / "experiment.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    before = (w / "experiment.yaml").read_bytes()
    line = refused(capsys, "teach", "--workdir", w, *LOCAL, *(["-n"] if dry_run else []))
    assert line.startswith("error: ") and expect in line
    assert os.listdir(w) == ["experiment.yaml"] and (w / "experiment.yaml").read_bytes() == before
    assert not (tmp_path / "escape").exists() and os.listdir(tmp_path / "runs") == ["w"]


def test_several_errors_print_the_first_and_count_the_rest(tmp_path, capsys, data):
    w = tmp_path / "w"
    w.mkdir()
    doc = experiment(*data)
    doc["teach"].update(epochs="ten", lr="fast")
    doc["cache"]["views"] = 0
    (w / "experiment.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    line = refused(capsys, "fuse", "--workdir", w, "-n", "--device", "cpu")
    assert line == (f"error: {w / 'experiment.yaml'}: teach.epochs: expected an integer >= 1, "
                    "got 'ten' (and 2 more)")


OPTION_CASES = [
    (["--lr", "inf"], "--lr inf: expected a finite number > 0"),
    (["--lr", "nan"], "--lr nan: expected a finite number > 0"),
    (["--lr", "0.0"], "--lr 0.0: expected a finite number > 0"),
    (["--input-size", 0], "--input-size 0: expected an integer >= 8"),
    (["--seed", "99999999999999999999999"],
     "--seed 99999999999999999999999: expected an integer in [0, 18446744073709551615]"),
    (["--seed", -1], "--seed -1: expected an integer in [0, 18446744073709551615]"),
    (["--epochs", 0], "--epochs 0: expected an integer >= 1"),
    (["--batch-size", 0], "--batch-size 0: expected an integer >= 1"),
    (["--holdout", 1.5], "--holdout 1.5: expected a fraction in [0, 1)"),
    (["--levels", 0], "--levels 0: expected an integer >= 1"),
]


OPTION_RUNS = [(verb, args, expect) for verb in (["teach"], ["distill", "-n"])
               for args, expect in OPTION_CASES
               if verb == ["distill", "-n"] or args[0] != "--levels"]  # teach has no --levels


@pytest.mark.parametrize("verb,args,expect", OPTION_RUNS,
                         ids=[" ".join(map(str, v + a)) for v, a, _ in OPTION_RUNS])
def test_invalid_options_are_refused_before_anything_is_written(tmp_path, capsys, data, verb,
                                                                  args, expect):
    a, b = data
    w = tmp_path / "w"
    line = refused(capsys, *verb, "--workdir", w, "--teacher", f"{a}=test_resnet",
                   "--teacher", f"{b}=test_convnext", *LOCAL, *args)
    assert line == f"error: {expect}, got {args[1]}"
    assert not w.exists()


def test_invalid_option_leaves_an_existing_experiment_alone(tmp_path, capsys, data):
    w = tmp_path / "w"
    w.mkdir()
    (w / "experiment.yaml").write_text(yaml.safe_dump(experiment(*data), sort_keys=False))
    line = refused(capsys, "teach", "--workdir", w, "--seed", "99999999999999999999999",
                   *LOCAL)
    assert "--seed 99999999999999999999999: expected an integer" in line
    assert os.listdir(w) == ["experiment.yaml"]


def _image_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for i, cls in enumerate(("circle", "square")):
            (root / split / cls).mkdir(parents=True)
            Image.new("L", (16, 16), 60 * i).save(root / split / cls / "0.png")
    return root


def test_workdir_or_cache_inside_a_dataset_folder_is_refused(tmp_path, capsys, data):
    folder = _image_folder(tmp_path / "shapes")
    teachers = ["--teacher", f"{folder}=test_resnet", "--teacher", f"{data[0]}=test_vit"]
    line = refused(capsys, "teach", "--workdir", folder / "runs", *teachers, *LOCAL)
    assert line == (f"error: workdir {(folder / 'runs').resolve()} is inside datasets[0].source "
                    f"{folder.resolve()} (dataset 'shapes'): choose a location outside it")
    line = refused(capsys, "distill", "-n", "--workdir", folder, *teachers, *LOCAL)
    assert f"workdir {folder.resolve()} is inside datasets[0].source" in line
    w = tmp_path / "w"
    line = refused(capsys, "distill", "--workdir", w, *teachers, "--cache-uri",
                   folder / "train" / "cache", *LOCAL)
    where = (folder / "train" / "cache").resolve()
    assert f"cache.uri '{where}' ({where}) is inside datasets[0].source" in line
    assert not w.exists() and not (folder / "runs").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["test", "train"]
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["circle", "square"]
    # the same in the file: a relative cache.uri resolves against the workdir
    w.mkdir()
    doc = experiment(*data)
    doc["datasets"][0]["source"] = str(folder)
    doc["cache"]["uri"] = "../shapes/cache"
    (w / "experiment.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    line = refused(capsys, "cache", "--workdir", w, "-n", *LOCAL)
    assert f"cache.uri '../shapes/cache' ({folder.resolve() / 'cache'}) is inside" in line
    assert os.listdir(w) == ["experiment.yaml"]


def test_teacher_option_names_and_suffixes_are_safe(tmp_path, capsys, monkeypatch):
    """--teacher names its dataset after the file: never hidden or '..'; an unknown ARCH
    suffix is an unknown architecture, not a directory name."""
    monkeypatch.chdir(tmp_path)
    a, b = make_npz(tmp_path / ".alpha.npz", 0), make_npz(tmp_path / "beta.npz", 1)
    code, out, err = run(capsys, "teach", "--workdir", "w", "--teacher", f"{a}=test_resnet",
                         "--teacher", f"{b}=test_vit:noflip", "--input-size", 16, "-n", "--json",
                         *LOCAL)
    assert code == 0, err
    assert [s["target"] for s in json.loads(out)["steps"]] == ["alpha", "beta"]
    line = refused(capsys, "teach", "--workdir", "w", "--teacher", f"{a}=test_resnet/../x",
                   "--teacher", f"{b}=test_vit", "--input-size", 16, *LOCAL)
    assert "unknown timm architecture 'test_resnet/../x'" in line
    assert not (tmp_path / "w").exists()


def test_every_preset_validates_and_round_trips_the_schema(tmp_path):
    for name in PRESETS:
        exp = get_preset(name)
        exp.validate()
        exp.save(tmp_path / f"{name}.yaml")
        assert Experiment.load(tmp_path / f"{name}.yaml").to_dict() == exp.to_dict()


def test_set_values_go_through_the_schema():
    """`mlfd compare --set` (and bench/accuracy.py, which calls it): values are checked."""
    from mlfd.stages.compare import apply_settings

    exp = apply_settings(get_preset("trio"), ["distill.epochs=4",
                                              "datasets.animal-mnist.teach.epochs=12",
                                              "teach.lr=5e-4"])
    assert exp.stage("teach", "animal-mnist").epochs == 12 and exp.teach.lr == 5e-4
    assert exp.distill.epochs == 4
    for a, expect in (("distill.epochs='4'", "distill.epochs: expected an integer >= 1, got '4'"),
                      ("datasets.mnist.teach.lr=fast",
                       "datasets[0].teach.lr: expected a finite number > 0, got 'fast'"),
                      ("fuse.dropout=1", "fuse.dropout: expected a number in [0, 1), got 1")):
        with pytest.raises(MlfdError) as e:
            apply_settings(copy.deepcopy(exp), [a])
        assert str(e.value) == f"--set {a}: {expect}"


def test_exponent_floats_in_the_file_are_numbers(tmp_path, data):
    """PyYAML (YAML 1.1) reads `lr: 1e-3` as a string; the file means a number."""
    doc = experiment(*data)
    text = yaml.safe_dump(doc, sort_keys=False).replace("lr: 0.001", "lr: 1e-3", 1)
    assert "lr: 1e-3" in text
    (tmp_path / "experiment.yaml").write_text(text)
    assert Experiment.load(tmp_path / "experiment.yaml").teach.lr == 1e-3
