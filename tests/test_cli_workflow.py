"""Workflow around the stages: export, workdir discovery, list, clean, the logs users read
(summary.csv, TensorBoard) and --teacher DATASET=ARCH:noflip."""

import csv
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers import LOCAL, TINY, bad, edit_experiment, make_npz, run, tree_snapshot

from mlfd.engine.metrics import MetricsLog, read_jsonl


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- export


def test_export_loads_with_plain_timm(ws, tmp_path, capsys):
    code, out, err = run(capsys, "eval", "--workdir", ws, "--json", *LOCAL)
    assert code == 0, err
    row = next(r for r in json.loads(out)["rows"]
               if (r["dataset"], r["model"], r["levels"]) == ("alpha", "student", 2))
    assert row["status"] == "complete"

    dest = tmp_path / "exported"
    code, out, err = run(capsys, "export", "--workdir", ws, "--dataset", "alpha", dest, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["dataset"], doc["levels"], doc["status"]) == ("alpha", 2, "complete")
    assert (dest / "model.safetensors").read_bytes() == \
        (ws / "students/alpha/L2/last.safetensors").read_bytes()
    cfg = json.loads((dest / "config.json").read_text())
    # distill wrote the same config beside the promoted student
    assert cfg == json.loads((ws / "students/alpha/L2/config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 3
    assert cfg["label_names"] == ["0", "1", "2"] and cfg["num_features"] > 0
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, 32, 32] and pre["num_classes"] == 3
    assert pre["interpolation"] == "bilinear" and pre["crop_pct"] == 1.0
    # alpha is grayscale: its single mean/std, replicated over the three channels mlfd feeds
    from mlfd.stages.common import RunOptions, evaluate_images, input_spec
    from mlfd.stages.evaluate import load_student
    from mlfd.workspace import Workspace

    w = Workspace.open(ws)
    spec = input_spec(w, "alpha")
    assert len(spec.mean) == 1
    assert pre["mean"] == [spec.mean[0]] * 3 and pre["std"] == [spec.std[0]] * 3

    import timm  # plain timm (importing mlfd above only made torchvision importable here)

    models = {
        "overlay": timm.create_model(
            cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
            pretrained_cfg_overlay=dict(cfg["pretrained_cfg"],
                                        file=str(dest / "model.safetensors")),
            **cfg.get("model_args", {})),
        "local-dir": timm.create_model(f"local-dir:{dest}", pretrained=True),
    }
    student = load_student(w, "alpha", 2, torch.device("cpu")).state_dict()
    opts = RunOptions(device=torch.device("cpu"), pipeline="torch")
    for how, m in models.items():
        m.eval()
        assert m.state_dict().keys() == student.keys(), how
        assert all(torch.equal(m.state_dict()[k], v) for k, v in student.items()), how
        r = evaluate_images(w, opts, "alpha", spec, m)
        assert r["top1"] == row["top1"] and r["n"] == row["n"], how


def test_export_takes_only_complete_students_unless_forced(ws, tmp_path, capsys):
    dest = tmp_path / "out"
    assert "no complete student of 'beta'" in bad(
        capsys, "export", "--workdir", ws, "--dataset", "beta", dest)
    assert "no student of 'alpha' at L1" in bad(
        capsys, "export", "--workdir", ws, "--dataset", "alpha", "--levels", 1, dest)
    assert "exactly one --dataset" in bad(capsys, "export", "--workdir", ws, dest)
    edit_experiment(ws, "distill", lr=0.5)  # the student is now stale
    msg = bad(capsys, "export", "--workdir", ws, "--dataset", "alpha", dest)
    assert "stale" in msg and "--force" in msg
    msg = bad(capsys, "export", "--workdir", ws, "--dataset", "alpha", "--levels", 2, dest)
    assert "distill.lr" in msg and "--force" in msg
    assert not dest.exists()
    code, out, err = run(capsys, "export", "--workdir", ws, "--dataset", "alpha", "--force",
                         dest)
    assert code == 0, err
    assert "L2 student (stale)" in out and (dest / "config.json").exists()


# --------------------------------------------------------------------------- discovery


def test_workdir_discovery(ws, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    shutil.copytree(ws, project / "mlfd-runs" / "one")
    monkeypatch.chdir(project)
    code, out, err = run(capsys, "eval", "--json", *LOCAL)  # no -w, no ./experiment.yaml
    assert code == 0, err
    doc = json.loads(out)
    assert Path(doc["workdir"]).name == "one"
    assert "the only experiment under mlfd-runs/" in err
    assert any(r["model"] == "student" and r["status"] == "complete" for r in doc["rows"])
    code, out, err = run(capsys, "distill", "--dataset", "alpha", "--dry-run", "--json", *LOCAL)
    assert code == 0, err
    assert Path(json.loads(out)["workdir"]).name == "one" and json.loads(out)["steps"] == []

    shutil.copytree(ws, project / "mlfd-runs" / "two")
    for args in (["eval"], ["distill", "--dataset", "alpha", "-n"], ["clean", "--caches"]):
        msg = bad(capsys, *args, *(LOCAL if args[0] != "clean" else []))
        assert "mlfd-runs/one" in msg and "mlfd-runs/two" in msg and "--workdir" in msg
    assert (project / "mlfd-runs/two/cache").is_dir()  # clean removed nothing


def test_unknown_dataset_without_an_experiment(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    msg = bad(capsys, "distill", "--dataset", "nosuch", *LOCAL)
    assert "unknown dataset 'nosuch'" in msg and "experiment.yaml" not in msg
    msg = bad(capsys, "teach", "--workdir", tmp_path / "w", "--dataset", "nosuch", *LOCAL)
    assert "unknown dataset 'nosuch'" in msg
    assert not (tmp_path / "mlfd-runs").exists() and not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- list


def test_list_shows_each_stage_and_writes_nothing(ws, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(ws, root / "a")
    shutil.copytree(ws, root / "b")
    edit_experiment(root / "b", "distill", lr=0.5)  # b's student is stale
    staged = root / "b" / "students" / "beta" / ".L2.partial"  # and beta's run interrupted
    staged.mkdir(parents=True)
    (staged / "last.json").write_text(json.dumps({"epoch": 1, "epochs": 3, "complete": False}))
    (root / "notes").mkdir()  # no experiment.yaml: not listed
    before = tree_snapshot(root)
    code, out, err = run(capsys, "list", "--root", root, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [Path(e["workdir"]).name for e in doc["experiments"]] == ["a", "b"]

    def states(e):
        return {(s["stage"], s["target"]): s["status"] for s in e["stages"]}

    a, b = doc["experiments"]
    assert states(a) == {("teach", "alpha"): "complete", ("teach", "beta"): "complete",
                         ("fuse", "joint L2"): "complete", ("distill", "alpha L2"): "complete",
                         ("distill", "beta L2"): "missing"}
    assert states(b)[("distill", "alpha L2")] == "stale"
    assert states(b)[("distill", "beta L2")] == "incomplete"
    assert states(b)[("teach", "alpha")] == "complete"
    assert "stale: distill.lr" in next(s["reason"] for s in b["stages"]
                                       if s["target"] == "alpha L2")
    assert "stale" in err  # the table went to stderr beside --json
    code, out, _ = run(capsys, "list", "--root", root)
    assert code == 0 and "incomplete" in out and "missing" in out
    assert tree_snapshot(root) == before
    code, out, _ = run(capsys, "list", "--root", tmp_path / "none", "--json")
    assert code == 0 and json.loads(out)["experiments"] == []


# --------------------------------------------------------------------------- clean


def test_clean_caches_keeps_checkpoints_then_all_keeps_the_experiment(ws, capsys):
    from mlfd.workspace import Workspace

    checkpoints = {p: p.read_bytes() for p in ws.rglob("*.safetensors")
                   if "cache" not in p.relative_to(ws).parts}
    assert checkpoints
    staged = ws / "teachers" / ".alpha.partial"  # an interrupted run's staging dir
    staged.mkdir()
    (staged / "resume.pt").write_bytes(b"x" * 1000)
    experiment = (ws / "experiment.yaml").read_bytes()

    assert "--caches" in bad(capsys, "clean", "--workdir", ws)
    assert "not an mlfd workdir" in bad(capsys, "clean", "--workdir", ws / "students", "--all")
    assert (ws / "students/alpha/L2/last.safetensors").exists()
    code, out, err = run(capsys, "clean", "--workdir", ws, "--caches", "--dry-run", "--json")
    assert code == 0, err
    planned = json.loads(out)
    assert sorted(Path(r["path"]).relative_to(ws).as_posix() for r in planned["removed"]) == [
        "cache/targets-L2.zarr", "cache/teachers-L2.zarr", "teachers/.alpha.partial"]
    assert planned["dry_run"] and staged.exists() and (ws / "cache/teachers-L2.zarr").exists()

    with Workspace.open(ws).locked():  # another run holds the workdir
        assert "in use" in bad(capsys, "clean", "--workdir", ws, "--caches")
    assert staged.exists()

    code, out, err = run(capsys, "clean", "--workdir", ws, "--caches")
    assert code == 0, err
    assert "removed cache/teachers-L2.zarr" in out and "removed teachers/.alpha.partial" in out
    assert f"removed 3 path(s), {planned['bytes']} bytes" in out and planned["bytes"] > 1000
    assert not list((ws / "cache").glob("*.zarr")) and not staged.exists()
    assert {p: p.read_bytes() for p in checkpoints} == checkpoints
    assert (ws / "experiment.yaml").read_bytes() == experiment

    # the next distill rebuilds only the caches: their fingerprints are the same, so the
    # teachers, the joint teacher and the student made from identical caches are kept
    code, out, err = run(capsys, "distill", "--workdir", ws, "--dataset", "alpha", "--dry-run",
                         "--json", *LOCAL)
    assert code == 0, err
    steps = [(s["verb"], s["target"]) for s in json.loads(out)["steps"]]
    assert steps == [("cache", "teacher embeddings L2"), ("cache", "joint targets L2")]

    code, out, err = run(capsys, "clean", "--workdir", ws, "--all", "--json")
    assert code == 0, err
    gone = {Path(r["path"]).name for r in json.loads(out)["removed"]}
    assert gone == {"teachers", "joint", "students", "reports", "cache"}
    assert sorted(p.name for p in ws.iterdir()) == [".mlfd.lock", "experiment.yaml"]
    assert (ws / "experiment.yaml").read_bytes() == experiment


def test_clean_caches_removes_the_stores_under_cache_uri(ws, tmp_path, capsys):
    import shutil

    import fsspec
    import yaml

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for store in (ws / "cache").glob("*.zarr"):
        shutil.move(store, elsewhere / store.name)
    staged = elsewhere / ".targets-L2.zarr.partial"
    staged.mkdir()
    (staged / "c0").write_bytes(b"y" * 300)  # no mlfd group in it: left alone
    (elsewhere / "notes.txt").write_text("not a cache: stays")
    exp = yaml.safe_load((ws / "experiment.yaml").read_text())
    exp["cache"]["uri"] = str(elsewhere)
    (ws / "experiment.yaml").write_text(yaml.safe_dump(exp))
    want = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            for p in elsewhere.iterdir() if p.is_dir() and p != staged}
    assert set(want) == {"teachers-L2.zarr", "targets-L2.zarr"}

    code, out, err = run(capsys, "clean", "--workdir", ws, "--caches", "--json")
    assert code == 0, err
    doc = json.loads(out)
    removed = {Path(r["path"]).name: r["bytes"] for r in doc["removed"]}
    assert removed == want  # sizes measured independently above
    assert doc["left_alone"] == [{"path": str(staged), "reason": "c0 is not in a cache group"}]
    assert sorted(p.name for p in elsewhere.iterdir()) == [".targets-L2.zarr.partial",
                                                           "notes.txt"]
    assert (ws / "students/alpha/L2/last.safetensors").exists()

    # an fsspec URL: the same, through the filesystem's own listing (a store mlfd did not
    # write stays: see test_cache_trust.py for one it did)
    fs = fsspec.filesystem("memory")
    fs.pipe({"/clean-test/teachers-L2.zarr/zarr.json": b"{}",
             "/clean-test/teachers-L2.zarr/c/0": b"z" * 500,
             "/clean-test/keep.txt": b"k"})
    exp["cache"]["uri"] = "memory://clean-test"
    (ws / "experiment.yaml").write_text(yaml.safe_dump(exp))
    code, out, err = run(capsys, "clean", "--workdir", ws, "--caches")
    assert code == 0, err
    assert ("left alone memory://clean-test/teachers-L2.zarr: c/0 is not in a cache "
            "group") in err
    assert fs.exists("/clean-test/teachers-L2.zarr/c/0") and fs.exists("/clean-test/keep.txt")
    fs.rm("/clean-test", recursive=True)


# --------------------------------------------------------------------------- logs


def test_every_training_run_writes_summary_csv(ws):
    for run_dir in ("teachers/alpha", "teachers/beta", "joint/L2", "students/alpha/L2"):
        rows = read_jsonl(ws / run_dir / "metrics.jsonl")
        table = _csv(ws / run_dir / "summary.csv")
        assert [int(r["epoch"]) for r in table] == [r["epoch"] for r in rows] == [1]
        assert list(table[0])[:3] == ["epoch", "lr", "train_loss"]
        assert float(table[0]["top1"]) == rows[0]["top1"]
        assert table[0].get("top5", "") == ""  # 3 or 4 classes: top-5 is n/a
    student = list(_csv(ws / "students/alpha/L2/summary.csv")[0])
    assert {"train_ce", "train_kd", "train_mse_L1", "train_mse_L2"} <= set(student)
    assert "alpha/top1" in _csv(ws / "joint/L2/summary.csv")[0]


def test_summary_csv_follows_a_resumed_run(tmp_path):
    from mlfd.engine.artifact import TrainRun

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    final = tmp_path / "run"

    def row(epoch):
        return {"epoch": epoch, "lr": 0.1, "train_images_per_s": 9.0, "train_loss": 1.0 / epoch,
                "train_ce": 0.5 / epoch, "top1": epoch / 10, "top5": None, "n": 10}

    first = TrainRun(final, {"kind": "test"}, {"x": 1}, model.state_dict)
    assert first.begin(model, opt, sched)[0] == 0
    for e in (1, 2):
        first.end_epoch(e, 4, row(e), True, model, opt, sched, row(e), [])
    first.metrics.write(**row(3))  # epoch 3 logged, then killed before its checkpoint
    staged = first.dir
    assert [r["epoch"] for r in _csv(staged / "summary.csv")] == ["1", "2", "3"]

    again = TrainRun(final, {"kind": "test"}, {"x": 1}, model.state_dict)
    assert again.begin(model, opt, sched)[0] == 2
    assert [r["epoch"] for r in _csv(staged / "summary.csv")] == ["1", "2"]
    for e in (3, 4):
        again.end_epoch(e, 4, row(e), e == 4, model, opt, sched, row(e), [])
    again.finish()
    table = _csv(final / "summary.csv")
    assert [r["epoch"] for r in table] == ["1", "2", "3", "4"]
    assert [r["epoch"] for r in read_jsonl(final / "metrics.jsonl")] == [1, 2, 3, 4]
    assert list(table[0]) == ["epoch", "lr", "train_loss", "train_ce", "top1", "top5"]
    assert table[3]["top1"] == "0.4" and table[3]["top5"] == ""
    # a fresh run starts both files afresh
    MetricsLog(final / "metrics.jsonl")
    assert not (final / "metrics.jsonl").exists() and not (final / "summary.csv").exists()


def test_tensorboard_mirror_rows_and_purge_on_resume(tmp_path, monkeypatch):
    """The mirror's calls, with a stand-in SummaryWriter (tensorboard need not be installed)."""
    calls = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("open", Path(log_dir).name, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    log.write(epoch=1, lr=0.1, train_loss=0.5, top1=0.25, top5=None, n=8)
    log.write(epoch=2, lr=0.05, train_loss=0.4, top1=0.5, top5=None, n=8)
    log.close()
    assert calls == [("open", "tensorboard", None), ("lr", 0.1, 1), ("train/loss", 0.5, 1),
                     ("test/top1", 0.25, 1), ("lr", 0.05, 2), ("train/loss", 0.4, 2),
                     ("test/top1", 0.5, 2), ("close",)]
    calls.clear()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", fresh=False, tensorboard=True)
    resumed.keep_epochs(1)
    resumed.write(epoch=2, lr=0.05, train_loss=0.3, top1=0.75, top5=None, n=8)
    assert calls[0] == ("open", "tensorboard", 2)  # events of epoch >= 2 are replaced
    assert not MetricsLog(tmp_path / "other.jsonl").tensorboard  # off unless asked for


def test_log_tensorboard_needs_the_package(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    before = tree_snapshot(ws)
    for verb in ("teach", "fuse", "distill"):
        msg = bad(capsys, verb, "--workdir", ws, "--log", "tensorboard", "--force", *LOCAL[:2])
        assert "pip install tensorboard" in msg
    assert "unknown --log 'csv'" in bad(capsys, "fuse", "--workdir", ws, "--log", "csv",
                                        *LOCAL[:2])
    assert tree_snapshot(ws) == before


def test_log_tensorboard_writes_event_files(ws, capsys):
    pytest.importorskip("tensorboard")
    code, _, err = run(capsys, "fuse", "--workdir", ws, "--levels", 2, "--force", "--log",
                       "tensorboard", "--device", "cpu")
    assert code == 0, err
    assert list((ws / "joint/L2/tensorboard").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------- :noflip


def test_teacher_noflip_is_recorded(tmp_path, capsys):
    a, b = make_npz(tmp_path / "alpha.npz", 0), make_npz(tmp_path / "beta.npz", 1, classes=4)
    w = tmp_path / "ws"
    code, _, err = run(capsys, "teach", "--workdir", w, "--teacher", f"{a}=test_resnet:noflip",
                       "--teacher", f"{b}=test_vit:flip", "--dataset", "alpha", *TINY)
    assert code == 0, err
    exp = yaml.safe_load((w / "experiment.yaml").read_text())
    assert [(d["name"], d["arch"], d["hflip"]) for d in exp["datasets"]] == [
        ("alpha", "test_resnet", False), ("beta", "test_vit", True)]
    meta = json.loads((w / "teachers/alpha/last.json").read_text())
    assert meta["fingerprint"]["model.hflip"] is False
    # the same teachers without a suffix: this experiment; with another flip: another one
    code, _, err = run(capsys, "teach", "--workdir", w, "--teacher", f"{a}=test_resnet",
                       "--teacher", f"{b}=test_vit", "-n", *TINY)
    assert code == 0, err
    assert "already holds another experiment" in bad(
        capsys, "teach", "--workdir", w, "--teacher", f"{a}=test_resnet:flip", "--teacher",
        f"{b}=test_vit", "-n", *TINY)
    assert "unknown timm architecture 'test_resnet:mirror'" in bad(
        capsys, "teach", "--workdir", tmp_path / "w2", "--teacher", f"{a}=test_resnet:mirror",
        "--teacher", f"{b}=test_vit", *TINY)


@pytest.mark.parametrize("verb", ["export", "list", "clean"])
def test_help_of_the_new_verbs(capsys, verb):
    code, out, _ = run(capsys, verb, "--help")
    assert code == 0 and "Usage:" in out and "Example" in out
    assert "<bool" not in out and "<path" not in out and "list[str]" not in out
