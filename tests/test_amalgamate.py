"""`mlfd distill --amalgamate ARCH` (issue 18 §1): one student, a head per dataset."""

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
from helpers import LOCAL, bad, edit_experiment, run, tree_snapshot
from PIL import Image
from safetensors.torch import load_file
from test_ddp import REL_TOL, _rel_diff
from test_faults import _interrupt_after, _same_weights

from mlfd import _compat
from mlfd.workspace import Workspace

_compat.ensure_torchvision_importable()
import timm  # noqa: E402

ARCH = "test_convnext"
AM = ["distill", "--amalgamate", ARCH, "--levels", 2]
OUT = "students/amalgamated-test_convnext/L2"


def _test_split(ws: Path, name: str):
    """The npz a dataset of the fixture was made from: (uint8 NHWC images, labels)."""
    src = Path(Workspace.open(ws).exp.entry(name).source)
    z = np.load(src)
    return z["x_test"], z["y_test"]


def _pixels(x: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """The clean view, computed here: the whole image resized bilinearly, grey as RGB,
    normalised (float64, then float32 as the model runs)."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255.0
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    t = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((t - m) / s).float()


def _trained(ws: Path, capsys, *extra):
    code, out, err = run(capsys, *AM, "--workdir", ws, *LOCAL, *extra)
    assert code == 0, err
    return out, err


def test_amalgamated_student_end_to_end(ws, tmp_path, capsys):
    # the per-dataset distill ran in `ws` (student alpha L2); a dry run plans and writes nothing
    before = tree_snapshot(ws)
    code, out, err = run(capsys, *AM, "--workdir", ws, *LOCAL, "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert [(s["verb"], s["target"]) for s in plan["steps"]] == [
        ("cache", "joint targets L2"), ("distill", f"amalgamated {ARCH} L2")]
    assert "input 32px (the largest)" in err
    assert tree_snapshot(ws) == before

    out, err = _trained(ws, capsys, "--epochs", 1, "--json")
    doc = json.loads(out)
    assert [s["target"] for s in doc["steps"]] == ["joint targets L2", f"amalgamated {ARCH} L2"]
    meta = json.loads((ws / OUT / "last.json").read_text())
    assert meta["complete"] and meta["datasets"] == ["alpha", "beta"]
    assert meta["input_size"] == 32 and meta["input_rule"] == "largest"
    assert meta["fingerprint"]["amalgamate.input_size"] == 32
    state = load_file(str(ws / OUT / "last.safetensors"))
    assert state["heads.0.weight"].shape[0] == 3 and state["heads.1.weight"].shape[0] == 4
    assert (ws / OUT / "adaptors.safetensors").exists()

    # a second run reuses it
    out, err = _trained(ws, capsys)
    assert "0 step(s) to run" in err and "=  distill  amalgamated" in err
    assert f"amalgamate {ARCH} L2 epoch" not in err

    code, out, err = run(capsys, "eval", "--workdir", ws, "--json", *LOCAL)
    assert code == 0, err
    rows = [r for r in json.loads(out)["rows"] if r["model"] == "amalgamated"]
    assert [r["dataset"] for r in rows] == ["alpha", "beta"]
    predicted = {}
    for d, r in enumerate(rows):
        assert r["status"] == "complete" and r["arch"] == ARCH and r["levels"] == 2
        assert r["n"] == 24 and r["top1"] is not None
        # independently: export the head, load it with plain timm, run the test split here
        dest = tmp_path / f"head-{r['dataset']}"
        code, _, err = run(capsys, "export", dest, "--workdir", ws, "--dataset", r["dataset"],
                           "--amalgamated")
        assert code == 0, err
        config = json.loads((dest / "config.json").read_text())
        assert config["num_classes"] == meta["num_classes"][d]
        assert [h["dataset"] for h in config["amalgamated"]["heads"]] == [r["dataset"]]
        assert config["label_names"] == config["amalgamated"]["heads"][0]["label_names"]
        model = timm.create_model(f"local-dir:{dest}", pretrained=True).eval()
        x, y = _test_split(ws, r["dataset"])
        pre = config["pretrained_cfg"]
        pixels = _pixels(x, pre["input_size"][1], pre["mean"], pre["std"])
        with torch.no_grad():
            logits = model(pixels)
            # the same logits as the workdir's student through its head d
            ref = F.linear(_backbone(state)(pixels), state[f"heads.{d}.weight"],
                           state[f"heads.{d}.bias"])
        assert torch.equal(logits, ref)
        top1 = float((logits.argmax(1).numpy() == y).mean())
        predicted[r["dataset"]] = [config["label_names"][i] for i in logits.argmax(1).tolist()]
        assert r["top1"] == pytest.approx(top1, abs=1e-12)
    md = (ws / "reports" / "results.md").read_text()
    assert f"amalgamated student L2 ({ARCH})" in md

    # every head at once: the backbone loads in plain timm, the heads beside it
    dest = tmp_path / "all"
    code, out, err = run(capsys, "export", dest, "--workdir", ws, "--amalgamated", "--all-heads",
                         "--json")
    assert code == 0, err
    config = json.loads((dest / "config.json").read_text())
    assert config["num_classes"] == 0
    heads = config["amalgamated"]["heads"]
    assert [(h["dataset"], h["num_classes"]) for h in heads] == [("alpha", 3), ("beta", 4)]
    assert heads[1]["weight"] == "heads.1.weight"
    back = timm.create_model(f"local-dir:{dest}", pretrained=True).eval()
    hs = load_file(str(dest / "heads.safetensors"))
    x, _ = _test_split(ws, "beta")
    pixels = _pixels(x, 32, heads[1]["mean"], heads[1]["std"])
    with torch.no_grad():
        got = F.linear(back(pixels), hs["heads.1.weight"], hs["heads.1.bias"])
        assert torch.equal(got, timm.create_model(f"local-dir:{tmp_path / 'head-beta'}",
                                                  pretrained=True).eval()(pixels))

    # `mlfd predict`: the workdir's student through head beta, and the all-heads folder
    x, _ = _test_split(ws, "beta")
    paths = []
    for i, img in enumerate(x):
        paths.append(tmp_path / "images" / f"{i:02d}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(paths[-1])
    code, out, err = run(capsys, "predict", "--workdir", ws, "--dataset", "beta",
                         "--amalgamated", "--device", "cpu", *paths)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    assert [line.split("\t")[1] for line in lines] == predicted["beta"]
    code, out2, err = run(capsys, "predict", "--model", dest, "--dataset", "beta",
                          "--device", "cpu", *paths)
    assert code == 0, err
    assert out2 == out
    assert "holds the heads of alpha, beta: pick one with --dataset" in bad(
        capsys, "predict", "--model", dest, "--device", "cpu", *paths)

    # `mlfd list` shows it
    code, out, err = run(capsys, "list", "--root", ws.parent, "--json")
    assert code == 0, err
    stages = json.loads(out)["experiments"][0]["stages"]
    assert {"stage": "amalgamate", "target": f"amalgamated {ARCH} L2", "status": "complete",
            "reason": "up to date"} in stages


def _backbone(state: dict):
    model = timm.create_model(ARCH, num_classes=0)
    model.load_state_dict({k[len("backbone."):]: v for k, v in state.items()
                           if k.startswith("backbone.")})
    return model.eval()


def test_an_interrupted_amalgamation_resumes_to_the_uninterrupted_result(ws, tmp_path, capsys,
                                                                         monkeypatch):
    edit_experiment(ws, "distill", epochs=2)
    ref = tmp_path / "ref"
    shutil.copytree(ws, ref)
    _trained(ref, capsys)
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        code, _, err = run(capsys, *AM, "--workdir", ws, *LOCAL)
    assert code == 130, err
    staged = ws / "students" / "amalgamated-test_convnext" / ".L2.partial"
    assert staged.is_dir()
    code, out, err = run(capsys, *AM, "--workdir", ws, *LOCAL, "--dry-run")
    assert "resumes after epoch 1" in out
    _, err = _trained(ws, capsys)
    assert "resuming after epoch 1/2" in err and not staged.exists()
    _same_weights(ws / OUT / "last", ref / OUT / "last")


def test_input_size_rule_is_the_largest_and_in_the_fingerprint(ws):
    from mlfd.stages.amalgamate import amalgam_fingerprint, input_size

    w = Workspace.open(ws)
    assert input_size(w) == 32
    w.exp.datasets[1].input_size = 48
    assert input_size(w) == 48
    assert amalgam_fingerprint(w, ARCH, 2)["amalgamate.input_size"] == 48


def test_mixed_batches_keep_each_dataset_in_order_and_in_proportion():
    from mlfd.data.pipelines import Batch
    from mlfd.stages.amalgamate import mixed_batches, mixed_order

    rows = mixed_order([10, 30], epoch=0, seed=3, views=4)
    assert sorted(rows[rows[:, 0] == 1][:, 1].tolist()) == list(range(30))  # each sample once
    assert rows[:, 2].max() < 4
    counts = np.stack([np.bincount(rows[s:s + 8, 0], minlength=2) for s in range(0, 40, 8)])

    def pipe(d):  # batches of 7 in that dataset's order, index = its sample ids
        order = rows[rows[:, 0] == d][:, 1]
        for s in range(0, len(order), 7):
            i = torch.from_numpy(order[s:s + 7])
            yield Batch(i.float().view(-1, 1, 1, 1), i, i, i)

    got = list(mixed_batches([pipe(0), pipe(1)], counts))
    for step, parts in enumerate(got):
        want = rows[step * 8:(step + 1) * 8]
        for d, b in parts:
            assert b.index.tolist() == want[want[:, 0] == d][:, 1].tolist()


def test_bad_amalgamate_options_are_one_line(ws, capsys):
    assert "unknown timm architecture 'no_such_net'" in bad(
        capsys, "distill", "--amalgamate", "no_such_net", "--workdir", ws, *LOCAL)
    assert "leave out --dataset" in bad(capsys, *AM, "--dataset", "alpha", "--workdir", ws,
                                        *LOCAL)
    assert "no amalgamated student in this workdir" in bad(
        capsys, "export", ws / "x", "--workdir", ws, "--dataset", "alpha", "--amalgamated")


def test_two_processes_train_what_one_does(ws, tmp_path, capsys):
    two = tmp_path / "two"
    shutil.copytree(ws, two)
    torch.set_num_threads(1)  # as each rank runs
    try:
        _trained(ws, capsys)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    env = dict(os.environ, MLFD_NO_PROGRESS="1")
    cmd = [*AM, "--workdir", two, "--nproc", 2, *LOCAL]
    res = subprocess.run([sys.executable, "-m", "mlfd_cli.main", *map(str, cmd)], env=env,
                         capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr
    assert _rel_diff(ws / OUT / "last", two / OUT / "last") <= REL_TOL
