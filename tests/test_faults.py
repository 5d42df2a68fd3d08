"""Fault injection: kills, damage, full disks, concurrent runs and bad options.

Each test reproduces a way a realistic user loses work or gets numbers that are not the
experiment's, and asserts the exit code, a single `error:` line where one is due, that
nothing finished was lost, and that results equal an uninterrupted run.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import LOCAL, TINY, bad, edit_experiment, make_npz, run
from safetensors.torch import load_file

from mlfd.cache import CacheGroup
from mlfd.engine.artifact import TrainRun
from mlfd.engine.checkpoint import file_sha256, verify_checkpoint
from mlfd.stages.plan import plan_distill
from mlfd.workspace import Workspace


def _plan(w: Path, names=("alpha",), levels=2):
    return plan_distill(Workspace.open(w), list(names), levels)


def _weights(stem: Path) -> dict:
    # copies: safetensors maps the file, and some tests damage it afterwards
    return {k: v.clone() for k, v in load_file(str(stem.with_suffix(".safetensors"))).items()}


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _epochs(metrics: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]


# --------------------------------------------------------------------------- staleness


def test_plain_run_after_overrides_reuses_only_what_matches(ws, capsys):
    """Finding 4: results of `--epochs 1` are not reused when the experiment says more."""
    assert _plan(ws).steps == []  # the file now says what the overrides said
    edit_experiment(ws, "teach", epochs=2)
    steps = _plan(ws).steps
    assert [s.verb for s in steps] == ["teach", "teach", "cache", "fuse", "cache", "distill"]
    assert "teach.epochs 1 → 2" in steps[0].reason


UPSTREAM_OF = {  # the steps a change redoes, in order
    "teach": ["teach", "teach", "cache", "fuse", "cache", "distill"],
    "cache": ["cache", "fuse", "cache", "distill"],
    "fuse": ["fuse", "cache", "distill"],
    "distill": ["distill"],
}


@pytest.mark.parametrize("section,key,value,first,expect", [
    ("teach", "lr", 0.002, "teach", "teach.lr 0.001 → 0.002"),
    ("", "seed", 1, "teach", "seed 0 → 1"),
    ("fuse", "dropout", 0.5, "fuse", "fuse.dropout 0.85 → 0.5"),
    ("distill", "temperature", 3.0, "distill", "distill.temperature 2.0 → 3.0"),
    ("cache", "views", 2, "cache", "views 4 → 2"),
])
def test_every_parameter_is_in_the_fingerprint(ws, section, key, value, first, expect):
    """Each change redoes its stage and everything downstream, nothing upstream."""
    edit_experiment(ws, section, **{key: value})
    steps = _plan(ws).steps
    assert [s.verb for s in steps] == UPSTREAM_OF[first]
    assert expect in steps[0].reason, steps[0]


# --------------------------------------------------------------------------- resume


def _interrupt_after(monkeypatch, epoch: int) -> None:
    """Ctrl-C right after ``epoch`` is checkpointed (as a user pressing it between epochs)."""
    original = TrainRun.end_epoch

    def end_epoch(self, e, *args, **kw):
        original(self, e, *args, **kw)
        if e == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainRun, "end_epoch", end_epoch)


@pytest.mark.parametrize("stage", ["teach", "fuse", "distill", "baseline"])
def test_resumed_training_equals_uninterrupted(ws, tmp_path, capsys, monkeypatch, stage):
    """Finding 3: an interrupted run continues from its last epoch and ends bitwise equal."""
    section = {"teach": "teach", "fuse": "fuse", "distill": "distill", "baseline": "teach"}[stage]
    edit_experiment(ws, section, epochs=3)
    ref = tmp_path / "ref"
    shutil.copytree(ws, ref)
    cmd = {"teach": ["teach", "--dataset", "alpha"], "fuse": ["fuse", "--levels", 2],
           "distill": ["distill", "--dataset", "alpha", "--levels", 2],
           "baseline": ["teach", "--baseline", "multi-head", "--arch", "test_resnet"]}[stage]
    out = {"teach": "teachers/alpha", "fuse": "joint/L2", "distill": "students/alpha/L2",
           "baseline": "baselines/multi-head-test_resnet"}[stage]
    if stage == "distill":  # upstream must already be up to date for a distill-only resume
        assert [s.verb for s in _plan(ws).steps] == ["distill"]
    local = ["--device", "cpu"] if stage == "fuse" else LOCAL  # fuse reads no images
    code, _, err = run(capsys, *cmd, "--workdir", ref, *local)
    assert code == 0, err

    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        code, _, err = run(capsys, *cmd, "--workdir", ws, *local)
    assert code == 130
    assert "1/3 epochs kept" in err and "run the same command again to resume" in err
    staged = ws / Path(out).parent / f".{Path(out).name}.partial"
    assert _epochs(staged / "metrics.jsonl") == [1]
    code, _, err = run(capsys, *cmd, "--workdir", ws, *local)
    assert code == 0, err
    assert "resuming after epoch 1/3" in err
    assert not staged.exists()
    _same_weights(ws / out / "last", ref / out / "last")
    assert _epochs(ws / out / "metrics.jsonl") == [1, 2, 3]
    meta = json.loads((ws / out / "last.json").read_text())
    assert meta["complete"] and meta["epoch"] == 3


def test_restart_discards_the_staged_run(ws, capsys, monkeypatch):
    edit_experiment(ws, "teach", epochs=2)
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        assert run(capsys, "teach", "--dataset", "alpha", "--workdir", ws, *LOCAL)[0] == 130
    code, _, err = run(capsys, "teach", "--dataset", "alpha", "--restart", "--workdir", ws,
                       *LOCAL)
    assert code == 0 and "resuming" not in err
    assert _epochs(ws / "teachers/alpha/metrics.jsonl") == [1, 2]


# --------------------------------------------------------------------------- kills


def _spawn(*args) -> subprocess.Popen:
    env = dict(os.environ, MLFD_NO_PROGRESS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen([sys.executable, "-m", "mlfd_cli.main", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_after_epoch(proc: subprocess.Popen, staged: Path, epoch: int = 1,
                      timeout: float = 240) -> None:
    """SIGKILL ``proc`` once its staged run has checkpointed ``epoch``."""
    deadline = time.monotonic() + timeout
    meta = staged / "last.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stderr.read().decode()}")
        try:
            if json.loads(meta.read_text()).get("epoch", 0) >= epoch:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_during_teach_resumes_to_the_uninterrupted_result(ws, tmp_path, capsys):
    """A real SIGKILL (no handler runs) between or inside epochs: the next run resumes from
    the last checkpointed epoch and ends with the weights of an uninterrupted run."""
    edit_experiment(ws, "teach", epochs=12)
    ref = tmp_path / "ref"
    shutil.copytree(ws, ref)
    assert run(capsys, "teach", "--dataset", "alpha", "--workdir", ref, *LOCAL)[0] == 0
    proc = _spawn("teach", "--dataset", "alpha", "--workdir", ws, *LOCAL)
    _kill_after_epoch(proc, ws / "teachers/.alpha.partial", epoch=2)
    kept = json.loads((ws / "teachers/alpha/last.json").read_text())
    assert kept["complete"] and kept["epochs"] == 1  # the finished 1-epoch teacher is kept
    code, _, err = run(capsys, "teach", "--dataset", "alpha", "--workdir", ws, *LOCAL)
    assert code == 0 and "resuming after epoch" in err, err
    _same_weights(ws / "teachers/alpha/last", ref / "teachers/alpha/last")
    assert _epochs(ws / "teachers/alpha/metrics.jsonl") == list(range(1, 13))


def test_sigkill_keeps_finished_results_and_resumes(ws, capsys):
    """Findings 1, 2, 8: a killed re-run loses nothing finished; a concurrent run is
    refused; eval marks the half-trained run; the next run resumes it."""
    joint = ws / "joint/L2/last"
    student = ws / "students/alpha/L2"
    sha, metrics = file_sha256(joint.with_suffix(".safetensors")), \
        (student / "metrics.jsonl").read_bytes()

    proc = _spawn("fuse", "--workdir", ws, "--levels", 2, "--epochs", 60, "--device", "cpu")
    staged = ws / "joint/.L2.partial"
    _kill_after_epoch(proc, staged)
    assert file_sha256(joint.with_suffix(".safetensors")) == sha
    assert json.loads(joint.with_suffix(".json").read_text())["complete"]

    edit_experiment(ws, "distill", epochs=60)
    proc = _spawn("distill", "--workdir", ws, "--dataset", "alpha", *LOCAL)
    deadline = time.monotonic() + 120
    while (ws / ".mlfd.lock").read_text().strip() != str(proc.pid) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        msg = bad(capsys, "teach", "--workdir", ws, *LOCAL)  # a second run on the same workdir
        assert f"pid {proc.pid}" in msg and "in use" in msg
    finally:
        _kill_after_epoch(proc, student.parent / ".L2.partial")
    assert (student / "metrics.jsonl").read_bytes() == metrics  # the finished run's log

    code, out, err = run(capsys, "eval", "--workdir", ws, "--json", *LOCAL)
    assert code == 0, err
    rows = [r for r in json.loads(out)["rows"] if r["model"] == "student"]
    states = sorted((r["status"], r["top1"] is None) for r in rows)
    # the old student is stale (distill.epochs changed); the killed run is listed, unmeasured
    assert states == [("incomplete", True), ("stale", False)]
    assert "incomplete 1/60" in (ws / "reports/results.md").read_text()

    edit_experiment(ws, "distill", epochs=3)  # shorter: the staged 60-epoch run is not reused
    code, out, err = run(capsys, "distill", "--workdir", ws, "--dataset", "alpha", "--json",
                         *LOCAL)
    assert code == 0, err
    assert _epochs(student / "metrics.jsonl") == [1, 2, 3]
    rows = json.loads(out)["rows"]
    assert {r["status"] for r in rows if r["top1"] is not None} == {"complete"}
    # the killed 60-epoch fuse run is still listed (its staging is kept), never measured
    assert {(r["model"], r["status"], r["epochs"]) for r in rows if r["top1"] is None} == \
        {("joint", "incomplete", 60)}


# --------------------------------------------------------------------------- integrity


def test_truncated_checkpoint_is_retrained(ws, capsys):
    """Finding 5: a truncated teacher is not 'already trained'; it is redone, identically."""
    w = ws / "teachers/alpha/last.safetensors"
    before = _weights(w.with_suffix(""))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    steps = _plan(ws).steps
    assert steps[0].verb == "teach" and "corrupt" in steps[0].reason
    assert "sha256" in steps[0].reason and str(w) in steps[0].reason
    code, _, err = run(capsys, "teach", "--workdir", ws, *LOCAL)
    assert code == 0, err
    assert verify_checkpoint(w.with_suffix("")) is None
    after = _weights(w.with_suffix(""))
    assert all(torch.equal(before[k], after[k]) for k in before)  # training is deterministic


def _chunk(group: Path) -> Path:
    return next(p for p in sorted((group / "beta").rglob("*"))
                if p.is_file() and p.name != "zarr.json")


DAMAGE = {
    "flipped-bytes": lambda g: _flip(_chunk(g), lambda b: b[:20] + bytes(x ^ 0xFF for x in b[20:36])
                                     + b[36:]),
    "blosc-header": lambda g: _flip(_chunk(g), lambda b: b"\0" * 16 + b[16:]),
    "half-zarr-json": lambda g: _flip(g / "zarr.json", lambda b: b[: len(b) // 2]),
}


def _flip(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_cache_is_detected_and_rebuilt(ws, capsys, damage):
    g = ws / "cache/teachers-L2.zarr/beta/train"
    import zarr

    before = zarr.open_group(str(g), mode="r")["beta"][...]
    DAMAGE[damage](g)
    steps = _plan(ws).steps
    assert steps[0].verb == "cache" and "corrupt" in steps[0].reason
    code, _, err = run(capsys, "cache", "--workdir", ws, "--levels", 2, *LOCAL)
    assert code == 0, err
    assert "corrupt" in err
    np.testing.assert_array_equal(zarr.open_group(str(g), mode="r")["beta"][...], before)
    assert _plan(ws).steps == []  # same values, same fingerprint: nothing downstream is redone


def test_cache_extraction_resumes_at_shard(ws, capsys, monkeypatch):
    """An interrupted extraction continues from its last whole shard, with equal values."""
    import zarr

    from mlfd.cache import CacheWriter, layout

    g = ws / "cache/teachers-L2.zarr/alpha/train"
    before = zarr.open_group(str(g), mode="r")["alpha"][...]
    monkeypatch.setattr(layout, "CHUNK_BYTES", 4096)  # several chunks even for tiny data
    monkeypatch.setattr(layout, "SHARD_BYTES", 8192)  # and several shards of two chunks
    edit_experiment(ws, "cache", batch_size=16)  # and several batches per group
    calls = {"n": 0}
    original = CacheWriter.append

    def append(self, name, values, start=None):
        calls["n"] += 1
        if calls["n"] == 20:  # inside alpha/train: the first group extracted
            raise KeyboardInterrupt
        return original(self, name, values, start)

    with monkeypatch.context() as m:
        m.setattr(CacheWriter, "append", append)
        code, _, err = run(capsys, "cache", "--workdir", ws, "--levels", 2, "--force", *LOCAL)
    assert code == 130 and "resumes its extraction at the last complete shard" in err
    assert CacheGroup(g, {}).status() != "missing"  # the finished group is still there
    seen = {}
    original_begin = CacheGroup.begin

    def begin(self, arrays, restart=False):
        writer = original_begin(self, arrays, restart)
        seen[self.path.relative_to(ws).as_posix()] = {k: writer.cursor(k) for k in arrays}
        return writer

    monkeypatch.setattr(CacheGroup, "begin", begin)
    code, _, err = run(capsys, "cache", "--workdir", ws, "--levels", 2, "--force", *LOCAL)
    assert code == 0, err
    resumed = seen["cache/teachers-L2.zarr/alpha/train"]
    assert resumed["alpha"] == 48 and 0 < resumed["beta"] < 48, seen  # resumed, not restarted
    np.testing.assert_array_equal(zarr.open_group(str(g), mode="r")["alpha"][...], before)


# --------------------------------------------------------------------------- environment


def test_disk_full_keeps_the_finished_teacher(ws, capsys, monkeypatch):
    """Finding 7: ENOSPC is one `error:` line naming the path, exit 3, nothing lost."""
    import safetensors.torch

    sha = file_sha256(ws / "teachers/alpha/last.safetensors")

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run(capsys, "teach", "--workdir", ws, "--dataset", "alpha", "--force",
                       *LOCAL)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 3 and len(lines) == 1 and "Traceback" not in err
    assert "no space left on device" in lines[0] and ".partial" in lines[0]
    assert file_sha256(ws / "teachers/alpha/last.safetensors") == sha


def test_read_only_workdir_and_file_as_workdir(ws, tmp_path, capsys, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *a, **kw):
        if str(path).startswith(str(ws)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "open", read_only)
        code, _, err = run(capsys, "distill", "--workdir", ws, "--dataset", "alpha", *LOCAL)
    assert code == 3 and "read-only file system" in err and str(ws) in err
    assert "Traceback" not in err

    afile = tmp_path / "afile"
    afile.write_text("x")
    msg = bad(capsys, "distill", "--workdir", afile, "--preset", "demo")
    assert "not a directory" in msg and str(afile) in msg
    assert run(capsys, "distill", "--workdir", afile, "--preset", "demo")[0] == 3


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("args,expect", [
    (["--levels", 0], ">= 1"),
    (["--levels", 99], "outside"),
    (["--levels", "abc"], "--levels"),
    (["--device", "foo"], "unknown device"),
    (["--loss-backend", "foo"], "unknown loss backend"),
    (["--pipeline", "foo"], "unknown --pipeline"),
    (["--epochs", 0], "--epochs 0"),
    (["--lr", -1], "--lr -1"),
])
def test_rejected_options_write_nothing(tmp_path, capsys, args, expect):
    """Finding 6: validation happens before any work and before anything is written."""
    a, b = make_npz(tmp_path / "alpha.npz", 0), make_npz(tmp_path / "beta.npz", 1)
    w = tmp_path / "ws"
    msg = bad(capsys, "distill", "--workdir", w, "--teacher", f"{a}=test_resnet", "--teacher",
              f"{b}=test_convnext", *["--input-size", 32, "--batch-size", 16], *args)
    assert expect in msg
    assert not w.exists()


def test_rejected_options_leave_an_existing_experiment_alone(ws, capsys):
    before = (ws / "experiment.yaml").read_bytes()
    for args in (["--levels", 99], ["--levels", 0], ["--loss-backend", "foo"],
                 ["--dataset", "gamma"]):
        bad(capsys, "distill", "--workdir", ws, *args, *LOCAL)
        assert (ws / "experiment.yaml").read_bytes() == before
    assert _plan(ws).steps == []


def test_single_teacher_and_one_class_data(tmp_path, capsys):
    """Findings 6 and 9: no 1-dataset experiment is left behind; 1-class data is refused."""
    a = make_npz(tmp_path / "alpha.npz", 0)
    msg = bad(capsys, "teach", "--workdir", tmp_path / "w1", "--teacher", f"{a}=test_resnet")
    assert "at least two datasets" in msg and not (tmp_path / "w1").exists()
    one = make_npz(tmp_path / "one.npz", 2, classes=1)
    msg = bad(capsys, "teach", "--workdir", tmp_path / "w2", "--teacher", f"{a}=test_resnet",
              "--teacher", f"{one}=test_resnet", *TINY)
    assert "at least 2" in msg and not (tmp_path / "w2").exists()


def test_top5_is_na_below_six_classes(finished, capsys):
    code, out, err = run(capsys, "eval", "--workdir", finished, "--json", *LOCAL)
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert rows and all(r["top5"] is None for r in rows)  # 3 and 4 classes
    assert "n/a" in (finished / "reports/results.md").read_text()


def test_relative_dataset_paths_work_from_anywhere(tmp_path, capsys, monkeypatch):
    """Finding 10: a workdir made with ../data paths evaluates from another directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    make_npz(tmp_path / "data/alpha.npz", 0)
    make_npz(tmp_path / "data/beta.npz", 1)
    monkeypatch.chdir(tmp_path / "work")
    code, _, err = run(capsys, "teach", "--workdir", "ws", "--teacher",
                       "../data/alpha.npz=test_resnet", "--teacher", "../data/beta.npz=test_vit",
                       "--dataset", "alpha", *TINY)
    assert code == 0, err
    exp = yaml.safe_load((tmp_path / "work/ws/experiment.yaml").read_text())
    assert exp["datasets"][0]["source"] == str(tmp_path / "data/alpha.npz")
    # A hand-edited relative path is taken relative to experiment.yaml.
    exp["datasets"][1]["source"] = "../../data/beta.npz"
    (tmp_path / "work/ws/experiment.yaml").write_text(yaml.safe_dump(exp))
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run(capsys, "eval", "--workdir", "../work/ws", "--json", *LOCAL)
    assert code == 0, err
    assert [r["dataset"] for r in json.loads(out)["rows"]] == ["alpha"]
