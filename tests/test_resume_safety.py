"""Resume state that is safe to load, full disks and SIGTERM (issue 21).

A workdir may come from anywhere: its resume state must not run code, and a damaged one
starts its stage over. A full disk is exit 3 with one line naming the file, no temporary
file left, and the stage resumable once space is freed. SIGTERM (preemption) stops a run
as Ctrl-C does.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from helpers import LOCAL, edit_experiment, run
from safetensors.torch import load_file

from mlfd.engine.artifact import TrainRun
from mlfd.stages.plan import plan_distill
from mlfd.stages.teach import teacher_fingerprint
from mlfd.storage.fingerprint import digest
from mlfd.workspace import Workspace

STAGED = "teachers/.alpha.partial"
TEACH = ("teach", "--dataset", "alpha")


def _epochs(metrics: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a.with_suffix(".safetensors"))), load_file(
        str(b.with_suffix(".safetensors")))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _lines(err: str, prefix: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith(prefix)]


def _leftovers(root: Path) -> list[str]:
    """Temporary files: ours (*.tmp) and zarr's (<name>.<uuid hex>.partial)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and (
        p.name.endswith(".tmp") or re.search(r"\.[0-9a-f]{32}\.partial$", p.name))]


def _interrupt_after(monkeypatch, epoch: int) -> None:
    """Ctrl-C right after ``epoch`` is checkpointed."""
    original = TrainRun.end_epoch

    def end_epoch(self, e, *args, **kw):
        original(self, e, *args, **kw)
        if e == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainRun, "end_epoch", end_epoch)


def _stage_resume(ws: Path, state) -> Path:
    """A staged teach run of alpha whose resume.json matches the experiment, with
    ``state`` saved as its resume.pt."""
    staged = ws / STAGED
    staged.mkdir(parents=True, exist_ok=True)
    fp = teacher_fingerprint(Workspace.open(ws), "alpha")
    (staged / "resume.json").write_text(json.dumps({"epoch": 1,
                                                    "fingerprint_digest": digest(fp)}))
    torch.save(state, staged / "resume.pt")
    return staged / "resume.pt"


# --------------------------------------------------------------------------- resume state


class _Payload:
    """What a crafted resume.pt could hide: unpickling it creates ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_resume_state_runs_no_code(ws, tmp_path, capsys):
    edit_experiment(ws, "teach", epochs=2)
    marker = tmp_path / "pwned"
    path = _stage_resume(ws, {"epoch": 1, "model": _Payload(marker), "optimizer": {},
                              "scheduler": {}, "rng": {}, "best": None, "history": []})
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run(capsys, *TEACH, "--workdir", ws, *LOCAL)
    assert not marker.exists()
    assert code == 0, err
    warnings = _lines(err, "warning:")
    assert len(warnings) == 1 and str(path) in warnings[0] and "starts over" in warnings[0]
    assert "io.open" in warnings[0]  # says what the file asked for, and that it was refused
    assert "resuming" not in err
    assert _epochs(ws / "teachers/alpha/metrics.jsonl") == [1, 2]
    meta = json.loads((ws / "teachers/alpha/last.json").read_text())
    assert meta["complete"] and meta["epoch"] == 2
    assert signal.getsignal(signal.SIGTERM) is before  # main() put the handler back


def test_truncated_resume_state_starts_over(ws, tmp_path, capsys, monkeypatch):
    edit_experiment(ws, "teach", epochs=2)
    ref = tmp_path / "ref"
    shutil.copytree(ws, ref)
    assert run(capsys, *TEACH, "--workdir", ref, *LOCAL)[0] == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        assert run(capsys, *TEACH, "--workdir", ws, *LOCAL)[0] == 130
    resume = ws / STAGED / "resume.pt"
    resume.write_bytes(resume.read_bytes()[: resume.stat().st_size // 2])
    code, _, err = run(capsys, *TEACH, "--workdir", ws, *LOCAL)
    assert code == 0, err
    warnings = _lines(err, "warning:")
    assert len(warnings) == 1 and str(resume) in warnings[0], err
    assert "resuming" not in err and "internal error" not in err
    assert _epochs(ws / "teachers/alpha/metrics.jsonl") == [1, 2]
    _same_weights(ws / "teachers/alpha/last", ref / "teachers/alpha/last")


def test_resume_state_that_fails_to_apply_leaves_the_model_as_it_was(ws, tmp_path, capsys,
                                                                      monkeypatch):
    """A readable state whose optimiser part does not fit: the model weights it loaded
    first are undone, so the run that starts over equals an uninterrupted one."""
    edit_experiment(ws, "teach", epochs=2)
    ref = tmp_path / "ref"
    shutil.copytree(ws, ref)
    assert run(capsys, *TEACH, "--workdir", ref, *LOCAL)[0] == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        assert run(capsys, *TEACH, "--workdir", ws, *LOCAL)[0] == 130
    resume = ws / STAGED / "resume.pt"
    state = torch.load(resume, weights_only=True)
    state["optimizer"] = {"state": {}, "param_groups": []}  # model loads, optimiser cannot
    torch.save(state, resume)
    code, _, err = run(capsys, *TEACH, "--workdir", ws, *LOCAL)
    assert code == 0, err
    assert len(_lines(err, "warning:")) == 1 and "resuming" not in err
    _same_weights(ws / "teachers/alpha/last", ref / "teachers/alpha/last")


# --------------------------------------------------------------------------- full disk


def test_disk_full_during_teach(ws, capsys, monkeypatch):
    """safetensors raises a SafetensorError, not OSError, when the disk is full."""
    import safetensors.torch
    from safetensors import SafetensorError

    before = load_file(str(ws / "teachers/alpha/last.safetensors"))

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what it wrote before the disk filled
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        code, _, err = run(capsys, *TEACH, "--force", "--workdir", ws, *LOCAL)
    errors = _lines(err, "error:")
    assert code == 3 and len(errors) == 1 and "Traceback" not in err, err
    assert "no space left on device" in errors[0]
    assert str(ws / STAGED / "last.safetensors") in errors[0]
    assert _leftovers(ws) == []
    # space freed: the same command resumes from the epoch whose state was written
    code, _, err = run(capsys, *TEACH, "--force", "--workdir", ws, *LOCAL)
    assert code == 0, err
    assert "resuming after epoch 1/1" in err
    after = load_file(str(ws / "teachers/alpha/last.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # training is deterministic
    assert not (ws / STAGED).exists()


def test_disk_full_during_fuse(ws, capsys, monkeypatch):
    """torch.save raises its zip writer's RuntimeError and leaves a partial file behind; the
    disk then has no free space."""
    edit_experiment(ws, "fuse", epochs=2)
    real_save, real_usage = torch.save, shutil.disk_usage
    saves = {"n": 0}

    def save(obj, f, *a, **kw):
        if str(f).endswith("resume.pt.tmp"):
            saves["n"] += 1
            if saves["n"] == 2:  # epoch 2's state
                Path(f).write_bytes(b"PK\3\4" + b"\0" * 500)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                                   "pos 576 vs 534")
        return real_save(obj, f, *a, **kw)

    def usage(path):
        u = real_usage(path)
        return SimpleNamespace(total=u.total, used=u.total, free=0) \
            if str(path).startswith(str(ws)) else u

    local = ["--levels", 2, "--device", "cpu"]
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save)
        m.setattr(shutil, "disk_usage", usage)
        code, _, err = run(capsys, "fuse", "--workdir", ws, *local)
    errors = _lines(err, "error:")
    assert code == 3 and len(errors) == 1 and "Traceback" not in err, err
    assert "no space left on device" in errors[0]
    assert str(ws / "joint/.L2.partial/resume.pt") in errors[0]
    assert _leftovers(ws) == []
    code, _, err = run(capsys, "fuse", "--workdir", ws, *local)
    assert code == 0, err
    assert "resuming after epoch 1/2" in err
    assert _epochs(ws / "joint/L2/metrics.jsonl") == [1, 2]
    assert json.loads((ws / "joint/L2/last.json").read_text())["complete"]


def test_disk_full_during_cache(ws, capsys, monkeypatch):
    """zarr's write fails with an OSError that names no file."""
    import zarr
    from zarr.storage import _local

    from mlfd.cache import shards

    g = ws / "cache/teachers-L2.zarr/alpha/train"
    before = zarr.open_group(str(g), mode="r")["alpha"][...]
    real_put = _local._put

    def put(path, value, exclusive=False):
        if "/c/" in Path(path).as_posix():  # a shard, not metadata
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with _local._atomic_write(path, "wb") as f:
                f.write(b"\0" * 10)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive)

    def write_file(path, parts):  # mlfd's own shard writer (mlfd.cache.shards)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(_local, "_put", put)
        m.setattr(shards, "write_file", write_file)
        code, _, err = run(capsys, "cache", "--workdir", ws, "--levels", 2, "--force", *LOCAL)
    errors = _lines(err, "error:")
    assert code == 3 and len(errors) == 1 and "Traceback" not in err, err
    assert "no space left on device" in errors[0]
    assert str(ws / "cache/teachers-L2.zarr/alpha/.train.partial") in errors[0]
    assert _leftovers(ws) == []
    code, _, err = run(capsys, "cache", "--workdir", ws, "--levels", 2, "--force", *LOCAL)
    assert code == 0, err
    np.testing.assert_array_equal(zarr.open_group(str(g), mode="r")["alpha"][...], before)
    assert plan_distill(Workspace.open(ws), ["alpha"], 2).steps == []


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(ws, capsys):
    edit_experiment(ws, "teach", epochs=12)
    env = dict(os.environ, MLFD_NO_PROGRESS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-m", "mlfd_cli.main", *TEACH, "--workdir",
                             str(ws), *map(str, LOCAL)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    meta, deadline = ws / STAGED / "last.json", time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if json.loads(meta.read_text()).get("epoch", 0) >= 1:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    err = stderr.decode()
    assert proc.returncode == 143, err
    lines = _lines(err, "interrupted:")
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "epochs kept in" in lines[0] and "run the same command again to resume" in lines[0]
    assert _leftovers(ws) == []
    code, _, err = run(capsys, *TEACH, "--workdir", ws, *LOCAL)
    assert code == 0 and "resuming after epoch" in err, err
    assert _epochs(ws / "teachers/alpha/metrics.jsonl") == list(range(1, 13))
