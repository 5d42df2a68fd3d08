"""The CLI end to end on tiny data and tiny models, and its answers to bad input."""

import json

import numpy as np
import pytest
import yaml
from helpers import TINY, bad, make_npz, run


@pytest.fixture
def tiny(tmp_path):
    a = make_npz(tmp_path / "alpha.npz", 0)
    b = make_npz(tmp_path / "beta.npz", 1, classes=4, channels=3)
    return tmp_path, a, b


def test_end_to_end_and_eval_json(tiny, capsys):
    tmp, a, b = tiny
    w = tmp / "ws"
    code, out, err = run(capsys, "distill", "--workdir", w, "--teacher", f"{a}=test_resnet",
                         "--teacher", f"{b}=test_vit", "--dataset", "alpha", "--levels", 2,
                         "--json", *TINY)
    assert code == 0, err
    doc = json.loads(out)  # stdout is exactly one JSON document; logs went to stderr
    assert [s["verb"] for s in doc["steps"]] == ["teach", "teach", "cache", "fuse", "cache",
                                                 "distill"]
    assert "[plan]" in err
    for stem in ("teachers/alpha/last", "teachers/beta/best", "joint/L2/last",
                 "students/alpha/L2/last"):
        assert (w / f"{stem}.safetensors").exists() and (w / f"{stem}.json").exists()
    assert (w / "cache" / "teachers-L2.zarr" / "beta" / "test").is_dir()
    assert (w / "reports" / "results.md").exists()
    assert (w / "reports" / "curves-alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out, err = run(capsys, "eval", "--workdir", w, "--json", "--device", "cpu",
                         "--pipeline", "torch")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    kinds = {(r["dataset"], r["model"], r["levels"]) for r in rows}
    assert {("alpha", "teacher", None), ("beta", "teacher", None), ("alpha", "joint", 2),
            ("beta", "joint", 2), ("alpha", "student", 2)} <= kinds
    for r in rows:
        # 3 and 4 classes: top-5 would be trivially 100 %, so it is n/a
        assert 0.0 <= r["top1"] <= 1.0 and r["top5"] is None and r["n"] == 24
        assert r["status"] == "complete"
    # The exported student is a plain timm model.
    import timm
    from safetensors.torch import load_file

    import mlfd  # noqa: F401

    m = timm.create_model("test_resnet", num_classes=3)
    m.load_state_dict(load_file(str(w / "students/alpha/L2/last.safetensors")))

    # A second distill with the same options finds everything up to date.
    code, out, err = run(capsys, "distill", "--workdir", w, "--dataset", "alpha", "--json", *TINY)
    assert code == 0, err
    assert json.loads(out)["steps"] == [] and "up to date" in err
    # --force redoes only the distillation: upstream results are reused.
    code, out, err = run(capsys, "distill", "--workdir", w, "--dataset", "alpha", "--force",
                         "--json", *TINY)
    assert code == 0, err
    assert [s["verb"] for s in json.loads(out)["steps"]] == ["distill"]

    # A checkpoint of another architecture is refused in one line.
    exp = yaml.safe_load((w / "experiment.yaml").read_text())
    exp["datasets"][0]["arch"] = "test_convnext"
    (w / "experiment.yaml").write_text(yaml.safe_dump(exp))
    code, out, err = run(capsys, "eval", "--workdir", w, "--device", "cpu", "--pipeline", "torch")
    assert code != 0 and "test_resnet" in err and "Traceback" not in err


def test_unknown_dataset(tmp_path, capsys):
    msg = bad(capsys, "distill", "--workdir", tmp_path / "w", "--teacher", "nosuchdata=test_vit",
               "--teacher", "mnist-mini=test_vit", "--dataset", "nosuchdata", *TINY)
    assert "nosuchdata" in msg


def test_missing_path(tmp_path, capsys):
    msg = bad(capsys, "teach", "--workdir", tmp_path / "w", "--teacher",
               f"{tmp_path}/missing.npz=test_vit", "--teacher", "mnist-mini=test_vit", *TINY)
    assert "missing" in msg


def test_no_experiment_yet(tmp_path, capsys):
    msg = bad(capsys, "eval", "--workdir", tmp_path / "empty")
    assert "--preset" in msg


@pytest.mark.parametrize("levels,expect", [(0, ">= 1"), (9, "outside")])
def test_impossible_levels(tiny, capsys, levels, expect):
    tmp, a, b = tiny
    msg = bad(capsys, "distill", "--workdir", tmp / "w", "--teacher", f"{a}=test_resnet",
               "--teacher", f"{b}=test_convnext", "--levels", levels, *TINY)
    assert expect in msg


def test_unknown_architecture_and_preset(tiny, capsys):
    tmp, a, b = tiny
    msg = bad(capsys, "teach", "--workdir", tmp / "w", "--teacher", f"{a}=resnet_unknown",
              "--teacher", f"{b}=test_vit", *TINY)
    assert "resnet_unknown" in msg
    assert "preset" in bad(capsys, "teach", "--workdir", tmp / "w2", "--preset", "paper-t9")


def test_corrupt_image_names_the_file(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                arr = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    broken = root / "train" / "dog" / "2.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    b = make_npz(tmp_path / "beta.npz", 1)
    msg = bad(capsys, "teach", "--workdir", tmp_path / "w", "--teacher", f"{root}=test_vit",
               "--teacher", f"{b}=test_vit", "--dataset", "folder", *TINY)
    assert "2.png" in msg


def test_stale_cache_is_refused_by_fuse(tiny, capsys):
    tmp, a, b = tiny
    w = tmp / "ws"
    args = ["--workdir", w, *TINY]
    assert run(capsys, "teach", "--teacher", f"{a}=test_resnet", "--teacher",
               f"{b}=test_convnext", *args)[0] == 0
    assert run(capsys, "cache", "--workdir", w, "--levels", 1, "--device", "cpu",
               "--pipeline", "torch")[0] == 0
    # Retraining a teacher changes its checkpoint: the cache no longer matches.
    assert run(capsys, "teach", "--dataset", "beta", "--force", "--seed", 5, *args)[0] == 0
    msg = bad(capsys, "fuse", "--workdir", w, "--levels", 1, "--device", "cpu", "--epochs", 1)
    assert "teachers" in msg and "re-run `mlfd cache" in msg


def test_info_json(capsys):
    code, out, _ = run(capsys, "info", "--json")
    import torch

    doc = json.loads(out)
    assert code == 0 and doc["cuda"] is torch.cuda.is_available()
    assert doc["torch"] == torch.__version__
    if not doc["cuda"]:
        assert doc["triton_kernel_active"] is False and doc["default_loss_backend"] == "torch"


@pytest.mark.parametrize("pipeline,backend", [("dali", "torch"), ("torch", "triton")])
def test_distill_through_dali_cpu_and_the_triton_kernel(tiny, capsys, pipeline, backend):
    """Every stage through DALI's CPU mode; the distill stage through the fused kernel
    (run by Triton's interpreter here, see conftest.py)."""
    if pipeline == "dali":
        pytest.importorskip("nvidia.dali")
    tmp, a, b = tiny
    w = tmp / "ws"
    args = [str(x) for x in TINY]
    args[args.index("--pipeline") + 1] = pipeline
    code, out, err = run(capsys, "distill", "--workdir", w, "--teacher", f"{a}=test_resnet",
                         "--teacher", f"{b}=test_convnext", "--dataset", "beta", "--levels", 2,
                         "--loss-backend", backend, "--json", *args)
    assert code == 0, err
    doc = json.loads(out)
    assert f"loss backend {backend}" in err
    meta = json.loads((w / "students/beta/L2/last.json").read_text())
    assert meta["loss_backend"] == backend
    # The distillation loss terms were logged and add up to the total.
    lines = (w / "students/beta/L2/metrics.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    parts = row["train_ce"] + row["train_kd"] + row["train_mse_L1"] + row["train_mse_L2"]
    assert parts == pytest.approx(row["train_loss"], rel=1e-4)
    assert any(r["model"] == "student" for r in doc["rows"])


@pytest.mark.parametrize("kind", ["multi-head", "joint-head"])
def test_multi_dataset_baselines(tiny, capsys, kind):
    tmp, a, b = tiny
    w = tmp / "ws"
    code, out, err = run(capsys, "teach", "--workdir", w, "--teacher", f"{a}=test_resnet",
                         "--teacher", f"{b}=test_vit", "--baseline", kind, "--arch",
                         "test_convnext", "--json", *TINY)
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    code, out, err = run(capsys, "eval", "--workdir", w, "--json", "--device", "cpu",
                         "--pipeline", "torch")
    rows = [r for r in json.loads(out)["rows"] if r["model"] == kind]
    assert code == 0 and [r["dataset"] for r in rows] == ["alpha", "beta"]
    # eval recomputes what training measured on the same (deterministic) test pass
    for r in rows:
        assert r["top1"] == pytest.approx(metrics[f"{r['dataset']}/top1"])
        assert r["arch"] == "test_convnext" and r["n"] == 24
    from safetensors.torch import load_file

    heads = load_file(str(w / f"baselines/{kind}-test_convnext/last.safetensors"))
    if kind == "joint-head":  # one head over the union of the 3 + 4 classes
        assert heads["heads.0.weight"].shape[0] == 7 and "heads.1.weight" not in heads
    else:  # one head per dataset
        assert heads["heads.0.weight"].shape[0] == 3 and heads["heads.1.weight"].shape[0] == 4


def test_teach_with_auto_augment(tiny, capsys):
    tmp, a, b = tiny
    w = tmp / "ws"
    code, out, err = run(capsys, "teach", "--workdir", w, "--teacher", f"{a}=test_resnet",
                         "--teacher", f"{b}=test_vit", "--dataset", "alpha", "--auto-augment",
                         "imagenet", *TINY)
    assert code == 0, err
    meta = json.loads((w / "teachers/alpha/last.json").read_text())
    assert meta["train"]["auto_augment"] == "imagenet"
    assert "auto_augment" in bad(capsys, "teach", "--workdir", w, "--dataset", "beta",
                                  "--auto-augment", "randaug", *TINY)
