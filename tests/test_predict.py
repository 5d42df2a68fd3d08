"""`mlfd predict`: a student on image files, as eval sees them; one line per image, stdin or
arguments, bad files reported and skipped, exported folders, pipes closed early."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LOCAL,
    TINY,
    bad,
    edit_experiment,
    make_npz,
    pin_overrides,
    quiet,
    run,
    tree_snapshot,
)
from PIL import Image

CLASSES = ("circle", "cross", "square")


def image_folder(root: Path, train: int = 12, test: int = 5) -> Path:
    """A learnable RGB folder dataset (a bright block whose place is the class), its images
    of several sizes and aspect ratios so that predict has to resize as eval does."""
    rng = np.random.default_rng(3)
    sizes = [(16, 16), (20, 14), (13, 24), (32, 32), (9, 11)]
    for split, n in (("train", train), ("test", test)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                h, w = sizes[i % len(sizes)]
                x = rng.integers(0, 50, (h, w, 3), dtype=np.uint8)
                x[h * c // 3: h * (c + 1) // 3, : w // 2] = 230
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x).save(path)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, image folder): a distilled L1 student of the folder dataset `shapes`."""
    root = tmp_path_factory.mktemp("predict")
    data = image_folder(root / "shapes")
    beta = make_npz(root / "beta.npz", 1)
    w = root / "ws"
    code = quiet("distill", "--workdir", w, "--teacher", f"{data}=test_resnet", "--teacher",
                 f"{beta}=test_resnet", "--dataset", "shapes", "--levels", 1, *TINY)
    assert code == 0
    pin_overrides(w)
    return w, data


def split_files(data: Path) -> list[str]:
    return sorted(str(p) for p in (data / "test").glob("*/*.png"))


def parse(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines()]


def test_labels_match_eval_and_an_independent_forward_pass(trained, capsys):
    w, data = trained
    files = split_files(data)
    before = tree_snapshot(w)
    code, out, err = run(capsys, "predict", "-w", w, "--dataset", "shapes", "--device", "cpu",
                         "--batch-size", 4, *files)
    assert code == 0, err
    assert tree_snapshot(w) == before  # read only: no lock, no report, nothing touched
    rows = parse(out)
    assert [r[0] for r in rows] == files and all(len(r) == 3 for r in rows)
    assert all(len(r[2].split(".")[1]) == 4 for r in rows)  # fixed decimals

    code, eout, err = run(capsys, "eval", "-w", w, "--json", *LOCAL)
    assert code == 0, err
    row = next(r for r in json.loads(eout)["rows"]
               if (r["dataset"], r["model"], r["levels"]) == ("shapes", "student", 1))
    hits = sum(r[1] == Path(r[0]).parent.name for r in rows)
    assert row["n"] == len(files) and hits / len(files) == row["top1"]

    # the reference: plain timm weights, float64 resize and normalisation, float64 forward
    from safetensors.torch import load_file

    from mlfd.models import create_backbone

    cfg = json.loads((w / "students/shapes/L1/config.json").read_text())
    net = create_backbone(cfg["architecture"], cfg["num_classes"]).double().eval()
    net.load_state_dict(load_file(w / "students/shapes/L1/last.safetensors"))
    pre = cfg["pretrained_cfg"]
    mean = torch.tensor(pre["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float64).view(1, 3, 1, 1)
    size = pre["input_size"][1:]
    x = torch.cat([F.interpolate(
        torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)[None]
        .double() / 255, size=size, mode="bilinear", align_corners=False) for f in files])
    with torch.no_grad():
        ref = net((x - mean) / std)
    probs = ref.softmax(1)
    labels = cfg["label_names"]
    assert labels == list(CLASSES)
    assert [r[1] for r in rows] == [labels[i] for i in ref.argmax(1).tolist()]
    got = torch.tensor([float(r[2]) for r in rows], dtype=torch.float64)
    assert torch.allclose(got, probs.max(1).values, atol=6e-5)  # 4 decimals, rounded

    # the library's logits: eval's, to float32 precision
    from mlfd.stages.predict import Predictor
    from mlfd.workspace import Workspace

    p = Predictor.from_workdir(Workspace.open(w), "shapes")
    mine = torch.stack([r.logits for b in p.predict(files, batch_size=3) for r in b])
    assert torch.allclose(mine.double(), ref, atol=1e-4)


def test_stdin_and_arguments_agree(trained, capsys, monkeypatch):
    w, data = trained
    files = split_files(data)
    args = ["predict", "-w", w, "--dataset", "shapes", "--device", "cpu"]
    code, out, err = run(capsys, *args, "--batch-size", 2, *files)
    assert code == 0, err
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{f}\n" for f in files) + "\n"))
    code, piped, err = run(capsys, *args, "-")
    assert code == 0, err
    assert piped == out and len(out.splitlines()) == len(files)


def test_a_bad_path_in_the_middle(trained, capsys, tmp_path):
    w, data = trained
    files = split_files(data)
    cut = tmp_path / "cut.png"
    good = Path(files[0]).read_bytes()
    cut.write_bytes(good[: len(good) // 2])
    missing = tmp_path / "gone.png"
    given = [*files[:3], str(missing), *files[3:6], str(cut), *files[6:]]
    code, out, err = run(capsys, "predict", "-w", w, "--dataset", "shapes", "--device", "cpu",
                         "--batch-size", 4, *given)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {missing}: file not found", f"error: {cut}: truncated"]
    assert [r[0] for r in parse(out)] == files  # every other file, in order

    line = bad(capsys, "predict", "-w", w, "--dataset", "shapes", "--device", "cpu",
               files[0], str(tmp_path))
    assert line == f"error: {tmp_path}: is a directory"


def test_exported_folder_topk_and_json(trained, capsys, tmp_path):
    w, data = trained
    files = split_files(data)
    code, out, err = run(capsys, "predict", "-w", w, "--dataset", "shapes", "--device", "cpu",
                         *files)
    assert code == 0, err
    dest = tmp_path / "out"
    # no --force: export judges a budget-sized student as complete, as predict did
    assert run(capsys, "export", "-w", w, "--dataset", "shapes", dest)[0] == 0
    code, exported, err = run(capsys, "predict", "--model", dest, "--device", "cpu", *files)
    assert code == 0, err
    assert exported == out

    code, out2, err = run(capsys, "predict", "--model", dest, "--device", "cpu", "--topk", 2,
                          *files)
    assert code == 0, err
    for top1, two in zip(parse(out), parse(out2), strict=True):
        assert len(two) == 5 and two[:3] == top1
        assert two[3] in CLASSES and two[3] != two[1] and float(two[4]) <= float(two[2])

    code, js, err = run(capsys, "predict", "--model", dest, "--device", "cpu", "--json",
                        "--topk", 3, *files)
    assert code == 0, err
    docs = [json.loads(line) for line in js.splitlines()]
    for doc, top1 in zip(docs, parse(out), strict=True):
        assert (doc["path"], doc["label"], f"{doc['prob']:.4f}") == tuple(top1)
        assert [t["label"] for t in doc["topk"]] == [CLASSES[t["index"]] for t in doc["topk"]]
        assert sorted(t["index"] for t in doc["topk"]) == [0, 1, 2]
        assert abs(sum(t["prob"] for t in doc["topk"]) - 1) < 1e-6

    assert "--topk 4: the model has 3 classes" in bad(
        capsys, "predict", "--model", dest, "--topk", 4, *files)
    assert "no config.json" in bad(capsys, "predict", "--model", tmp_path, *files)
    assert "needs --dataset" in bad(capsys, "predict", "-w", w, *files)
    assert "needs image paths" in bad(capsys, "predict", "-w", w, "--dataset", "shapes")


def test_a_stale_student_needs_force(trained, capsys, tmp_path):
    w = tmp_path / "ws"
    shutil.copytree(trained[0], w)
    files = split_files(trained[1])[:2]
    edit_experiment(w, "distill", lr=0.5)
    msg = bad(capsys, "predict", "-w", w, "--dataset", "shapes", "--device", "cpu", *files)
    assert "stale" in msg and "--force" in msg
    code, out, err = run(capsys, "predict", "-w", w, "--dataset", "shapes", "--device", "cpu",
                         "--force", *files)
    assert code == 0, err
    assert "shapes L1 student, stale" in err and len(out.splitlines()) == 2


def test_a_closed_pipe_ends_quietly(trained, tmp_path):
    w, data = trained
    dest = tmp_path / "out"
    assert quiet("export", "-w", w, "--dataset", "shapes", "--force", dest) == 0
    listing = tmp_path / "paths.txt"
    listing.write_text("".join(f"{f}\n" for f in split_files(data) * 400))
    env = dict(os.environ, MLFD_NO_PROGRESS="1")
    with open(listing) as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlfd_cli.main", "predict", "--model", str(dest),
             "--device", "cpu", "--batch-size", "1", "-"],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        first = proc.stdout.readline()  # like `| head -1`: one line, then the pipe closes
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    assert first.decode().startswith(split_files(data)[0] + "\t")
    assert code == 141 and "Traceback" not in err and "error" not in err, err
