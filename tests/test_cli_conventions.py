"""CLI conventions: --dry-run writes nothing, --version, -h, help without Python type names."""

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import LOCAL, TINY, bad, edit_experiment, make_npz, run, tree_snapshot

VERBS = ["teach", "cache", "fuse", "distill", "eval", "info"]


def _teachers(root: Path) -> list:
    a, b = make_npz(root / "alpha.npz", 0), make_npz(root / "beta.npz", 1, classes=4, channels=3)
    return ["--teacher", f"{a}=test_resnet", "--teacher", f"{b}=test_vit"]


def _dry(capsys, *args) -> tuple[dict, str]:
    code, out, err = run(capsys, *args, "--dry-run", "--json")
    assert code == 0, err
    return json.loads(out), err


# --------------------------------------------------------------------------- --dry-run


def test_dry_run_on_an_empty_workdir_creates_nothing(tmp_path, capsys):
    w = tmp_path / "ws"
    cmd = ["distill", "--workdir", w, *_teachers(tmp_path), "--dataset", "alpha", "--levels", 2,
           *TINY]
    doc, err = _dry(capsys, *cmd)
    assert doc["dry_run"] is True and doc["reused"] == []
    assert [s["verb"] for s in doc["steps"]] == ["teach", "teach", "cache", "fuse", "cache",
                                                 "distill"]
    assert doc["steps"][0]["reason"] == "not trained yet"
    assert "[plan]" in err and "nothing was run or written" in err
    code, out, _ = run(capsys, *cmd, "-n")  # without --json the plan is the output
    assert code == 0 and "1. teach" in out and "6. distill" in out
    assert bad(capsys, *cmd, "--levels", 0, "-n").endswith(">= 1, got 0")  # checked first
    assert not w.exists()


def test_dry_run_names_the_change_and_touches_nothing(ws, capsys):
    edit_experiment(ws, "teach", lr=0.002)
    before = tree_snapshot(ws)
    doc, _ = _dry(capsys, "distill", "--workdir", ws, "--dataset", "alpha", *LOCAL)
    assert [s["verb"] for s in doc["steps"]] == ["teach", "teach", "cache", "fuse", "cache",
                                                 "distill"]
    assert "teach.lr 0.001 → 0.002" in doc["steps"][0]["reason"]
    doc, _ = _dry(capsys, "teach", "--workdir", ws, "--dataset", "beta", *LOCAL)
    assert [(s["target"], "teach.lr" in s["reason"]) for s in doc["steps"]] == [("beta", True)]
    # cache and fuse go by the teachers there are: the teacher edit is not theirs to redo
    doc, _ = _dry(capsys, "fuse", "--workdir", ws, "--levels", 2, "--device", "cpu")
    assert doc["steps"] == [] and [s["reason"] for s in doc["reused"]] == ["up to date"]
    doc, _ = _dry(capsys, "cache", "--workdir", ws, "--levels", 2, *LOCAL)
    assert [(s["target"], s["reason"]) for s in doc["steps"]] == [("targets L2 beta", "missing")]
    assert tree_snapshot(ws) == before  # no lock taken, no file written, no mtime changed


def test_dry_run_of_each_stage(ws, capsys):
    doc, _ = _dry(capsys, "cache", "--workdir", ws, "--levels", 2, *LOCAL)
    assert {s["reason"] for s in doc["reused"]} == {"up to date"}
    assert [s["target"] for s in doc["reused"]] == [
        "teachers L2 alpha/train", "teachers L2 alpha/test", "teachers L2 beta/train",
        "teachers L2 beta/test", "targets L2 alpha"]  # only alpha was distilled
    shutil.rmtree(ws / "cache/teachers-L2.zarr/beta/test")
    before = tree_snapshot(ws)
    doc, _ = _dry(capsys, "cache", "--workdir", ws, "--levels", 2, *LOCAL)
    assert [(s["target"], s["reason"]) for s in doc["steps"]] == [
        ("teachers L2 beta/test", "missing"), ("targets L2 beta", "missing")]
    doc, _ = _dry(capsys, "fuse", "--workdir", ws, "--levels", 2, "--device", "cpu", "--force")
    assert [(s["verb"], s["reason"]) for s in doc["steps"]] == [("fuse", "forced")]
    doc, _ = _dry(capsys, "teach", "--workdir", ws, "--baseline", "multi-head", *LOCAL)
    assert [(s["target"], s["reason"]) for s in doc["steps"]] == [
        ("multi-head baseline test_resnet", "not trained yet")]
    assert tree_snapshot(ws) == before


# --------------------------------------------------------------------------- --version, -h


def test_version(capsys):
    from mlfd import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"mlfd {__version__}"


def test_bare_command_prints_the_help_once(capsys):
    code, out, _ = run(capsys)
    assert code == 0 and out.count("Usage:") == 1


@pytest.mark.parametrize("args", [["-h"], ["distill", "-h"]])
def test_short_help(capsys, args):
    code, out, _ = run(capsys, *args)
    assert code == 0 and "Usage:" in out and "--help" in out
    assert out == run(capsys, *args[:-1], "--help")[1]


@pytest.mark.parametrize("verb", ["", *VERBS])
def test_help_shows_no_python_types_and_real_paths(capsys, verb):
    code, out, _ = run(capsys, *([verb] if verb else []), "--help")
    assert code == 0, out
    assert not re.search(r"<(bool|int|float|str|path|list)\b", out), out
    assert "list[str]" not in out
    assert not re.search(r"(?<!mlfd-)\bruns/", out), out  # the default is mlfd-runs/<preset>
    if verb in ("teach", "cache", "fuse", "distill", "eval"):
        assert "mlfd-runs/demo" in out
