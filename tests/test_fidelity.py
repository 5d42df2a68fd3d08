"""Paper-fidelity settings: T2's AdamW, one-cycle ending at the constant lr, Xavier init,
baselines with their architecture's drop rates."""

import dataclasses
import importlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from mlfd.config import DatasetEntry, Experiment, TrainConfig
from mlfd.engine.loop import seed_everything
from mlfd.engine.optim import build_optimizer, build_scheduler, lr_factor
from mlfd.errors import MlfdError
from mlfd.models import build_level_backbone, create_backbone
from mlfd.models.backbone import apply_init
from mlfd.presets import demo, paper_t1, paper_t2

SECTIONS = ("teach", "fuse", "distill")


# --- 1. optimisers ---------------------------------------------------------------------

def test_paper_t2_trains_with_adamw_and_t1_with_adam():
    for sec in SECTIONS:
        cfg = getattr(paper_t2(), sec)
        opt = build_optimizer(nn.Linear(3, 2).parameters(), cfg)
        assert isinstance(opt, torch.optim.AdamW), sec  # decoupled weight decay (§4.4)
        assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 0.5
        cfg = getattr(paper_t1(), sec)
        opt = build_optimizer(nn.Linear(3, 2).parameters(), cfg)
        assert type(opt) is torch.optim.Adam, sec  # T1: Adam with (coupled) weight decay
        assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 1e-3


# --- 2. one-cycle that ends at the constant lr ----------------------------------------

def test_onecycle_constant_by_hand():
    f = lambda s, warmup=0, peak=10.0: lr_factor("onecycle-constant", s, 100, warmup, peak)  # noqa: E731
    assert f(0) == pytest.approx(1.0)  # starts at the base (constant) lr
    assert f(15) == pytest.approx(5.5)  # halfway up the linear ramp: 1 + 9 * 0.5
    assert f(30) == pytest.approx(10.0)  # peak at 30%
    assert f(65) == pytest.approx(1 + 9 * 0.5 * (1 + math.cos(math.pi * 0.5))) == pytest.approx(5.5)
    assert f(100) == pytest.approx(1.0)  # back at the base lr ...
    assert f(250) == pytest.approx(1.0)  # ... and it stays there
    assert f(30, peak=4.0) == pytest.approx(4.0)
    # A linear warm-up comes first, then the cycle over the remaining 90 steps.
    assert f(4, warmup=10) == pytest.approx(0.5)
    assert f(10, warmup=10) == pytest.approx(1.0)
    assert f(37, warmup=10) == pytest.approx(10.0)
    # The existing one-cycle is unchanged: it anneals to ~0.
    assert lr_factor("onecycle", 100, 100, 0) == pytest.approx(1e-4)


def test_onecycle_constant_scheduler_ends_at_the_configured_lr():
    cfg = TrainConfig(epochs=10, lr=1e-3, schedule="onecycle-constant", peak_factor=5.0)
    opt = build_optimizer(nn.Linear(3, 2).parameters(), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(5e-3) and int(np.argmax(lrs)) == 30
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_paper_presets_schedules():
    t1, t2 = paper_t1(), paper_t2()
    assert [getattr(t1, s).schedule for s in SECTIONS] == ["constant"] * 3  # §4.4: T1 constant
    # §4.4: T2 models use a one-cycle ending at the constant lr; the joint teacher stays constant.
    assert [getattr(t2, s).schedule for s in SECTIONS] == [
        "onecycle-constant", "constant", "onecycle-constant"]
    t2.validate()


def test_schedule_values_are_validated():
    exp = paper_t2()
    exp.teach.peak_factor = 0.5
    with pytest.raises(MlfdError, match="teach.peak_factor"):
        exp.validate()
    with pytest.raises(MlfdError, match="unknown schedule"):
        lr_factor("onecycle-const", 0, 10, 0)


# --- 3. Xavier initialisation ----------------------------------------------------------

def test_xavier_uniform_bounds_and_zero_bias():
    lin = apply_init(nn.Linear(1000, 500), "xavier")
    bound = math.sqrt(6 / (1000 + 500))
    assert lin.weight.abs().max().item() <= bound
    assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.count_nonzero(lin.bias) == 0
    conv = apply_init(nn.Conv2d(64, 128, 3), "xavier")  # fans count the 3x3 window
    bound = math.sqrt(6 / (64 * 9 + 128 * 9))
    assert conv.weight.abs().max().item() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.count_nonzero(conv.bias) == 0


def test_xavier_normal_is_algorithm_1s_gaussian():
    lin = apply_init(nn.Linear(1000, 500), "xavier-normal")
    assert lin.weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert lin.weight.std().item() == pytest.approx(math.sqrt(2 / 1500), rel=0.02)
    assert torch.count_nonzero(lin.bias) == 0


def test_default_init_keeps_timm_and_xavier_touches_only_linear_and_conv():
    def fresh():
        torch.manual_seed(0)
        return create_backbone("test_resnet", 7)

    ref = fresh().state_dict()
    default = apply_init(fresh(), "default").state_dict()
    assert all(torch.equal(default[k], ref[k]) for k in ref)
    model = apply_init(fresh(), "xavier")
    fc = model.get_classifier()
    bound = math.sqrt(6 / (fc.in_features + fc.out_features))
    assert not torch.equal(fc.weight, ref["fc.weight"]) and fc.weight.abs().max() <= bound
    assert torch.count_nonzero(fc.bias) == 0
    # Norm layers keep timm's init.
    bn = [k for k in ref if k.endswith("bn1.weight")]
    assert bn and all(torch.equal(model.state_dict()[k], ref[k]) for k in bn)


def test_init_choice_is_validated():
    with pytest.raises(MlfdError, match="unknown init"):
        apply_init(nn.Linear(2, 2), "kaiming")
    exp = demo()
    exp.distill.init = "kaiming"
    with pytest.raises(MlfdError, match="distill.init 'kaiming'"):
        exp.validate()


def test_presets_init():
    # Demo keeps timm's init (its results do not change); the paper presets follow Algorithm 1.
    assert [getattr(demo(), s).init for s in SECTIONS] == ["default"] * 3
    for exp in (paper_t1(), paper_t2()):
        assert [getattr(exp, s).init for s in SECTIONS] == ["xavier-normal", "default",
                                                            "xavier-normal"]


# --- stages: a workspace on tiny .npz data, `fit` replaced by a spy -------------------

def _npz(path, seed, classes):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, (24, 16, 16, 3), dtype=np.uint8)
    y = np.arange(24) % classes
    np.savez(path, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    return str(path)


def _workspace(tmp_path, entries, **teach):
    from mlfd.workspace import Workspace

    datasets = [DatasetEntry(name, _npz(tmp_path / f"{name}.npz", i, 3 + i), arch, 32, **kw)
                for i, (name, arch, kw) in enumerate(entries)]
    exp = Experiment(seed=3, datasets=datasets, teach=TrainConfig(epochs=1, batch_size=8, **teach))
    exp.validate()
    return Workspace(tmp_path / "ws", exp)


def _spy(monkeypatch, module):
    seen = {}

    def fake_fit(**kw):
        seen.update(kw)
        return SimpleNamespace(last={})

    monkeypatch.setattr(module, "fit", fake_fit)
    return seen


def test_teach_stage_applies_the_configured_init(tmp_path, monkeypatch):
    from mlfd.stages.common import RunOptions

    teach_mod = importlib.import_module("mlfd.stages.teach")  # the package re-exports teach()

    ws = _workspace(tmp_path, [("alpha", "test_resnet", {}), ("beta", "test_vit", {})],
                    init="xavier")
    seen = _spy(monkeypatch, teach_mod)
    teach_mod.teach(ws, RunOptions(torch.device("cpu"), pipeline="torch"), "alpha")
    seed_everything(ws.exp.seed)
    want = apply_init(build_level_backbone(ws.exp.datasets[0], 3), "xavier").state_dict()
    got = seen["model"].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.count_nonzero(seen["model"].model.get_classifier().bias) == 0
    assert seen["run"].fingerprint["teach.init"] == "xavier"


def test_baseline_uses_the_arch_entrys_drop_rates(tmp_path, monkeypatch):
    from mlfd.stages.common import RunOptions

    bl = importlib.import_module("mlfd.stages.baselines")
    from timm.layers import DropPath

    ws = _workspace(tmp_path, [
        ("alpha", "test_resnet", {"drop_rate": 0.25, "drop_path_rate": 0.05}),
        ("beta", "test_convnext", {"drop_rate": 0.3, "drop_path_rate": 0.1}),
    ])
    opts = RunOptions(torch.device("cpu"), pipeline="torch")

    def built(arch):
        seen = _spy(monkeypatch, bl)
        bl.train_baseline(ws, opts, "multi-head", arch=arch)
        bb = seen["model"].backbone
        max_dp = max((m.drop_prob for m in bb.modules() if isinstance(m, DropPath)), default=0.0)
        return bb.drop_rate, max_dp, seen["run"]

    # The entry whose arch matches (beta), not the first one.
    drop, drop_path, run = built("test_convnext")
    assert drop == 0.3 and drop_path == pytest.approx(0.1)  # the last block gets the full rate
    assert run.meta["drop_rate"] == 0.3 and run.meta["drop_path_rate"] == 0.1
    assert run.fingerprint["drop_rate"] == 0.3 and run.fingerprint["drop_path_rate"] == 0.1
    # No entry with this arch: the first entry's rates.
    drop, drop_path, run = built("test_efficientnet")
    assert drop == 0.25 and run.fingerprint["drop_path_rate"] == 0.05
    assert 0 < drop_path <= 0.05


def test_baseline_takes_its_arch_entrys_values_but_the_sections_epochs():
    from mlfd.stages.baselines import baseline_config

    exp = Experiment(datasets=[
        DatasetEntry("big", "big", "test_resnet", 32, teach={"lr": 0.01, "epochs": 2}),
        DatasetEntry("small", "small", "test_vit", 32, teach={"lr": 0.02, "epochs": 15}),
    ], teach=TrainConfig(epochs=3, lr=0.1, batch_size=8))
    # A small dataset's own epoch count is for passes over its own images; a baseline's
    # epoch is a pass over the largest dataset, so it keeps the section's 3 epochs.
    assert (baseline_config(exp, "test_vit").lr, baseline_config(exp, "test_vit").epochs) == \
        (0.02, 3)
    assert (baseline_config(exp, "test_resnet").lr, baseline_config(exp, "test_resnet").epochs) \
        == (0.01, 3)
    assert exp.stage("teach", "small").epochs == 15  # the teacher itself keeps its own


def test_new_fields_default_to_todays_behaviour():
    cfg = TrainConfig()
    assert (cfg.init, cfg.schedule) == ("default", "cosine")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"init", "peak_factor"} <= fields


# --------------------------------------------------------------------------- Table 1


def test_paper_presets_carry_table_1_per_model():
    """Every Table 1 value reaches the optimiser and the loss of its own model."""
    import torch

    from mlfd.engine.optim import build_optimizer
    from mlfd.presets import get_preset

    table = {  # arch: (lr, batch, weight decay, T, alpha, beta1, beta2), paper Table 1
        "resnet18": (1e-4, 768, 1e-3, 2, 0.6, 0.2, 0.2),
        "tf_efficientnet_b0": (1e-4, 240, 1e-3, 2, 0.6, 0.2, 0.2),
        "seresnext26d_32x4d": (1e-4, 192, 1e-3, 2, 0.6, 0.2, 0.2),
        "convnextv2_tiny": (1e-5, 96, 0.5, 5, 0.6, 0.2, 0.2),
        "swinv2_tiny_window8_256": (4e-4, 176, 0.5, 2, 0.6, 0.2, 0.2),
        "fastvit_sa24": (1e-4, 102, 0.5, 2, 0.4, 0.4, 0.2),
    }
    seen = set()
    for preset in ("paper-t1", "paper-t2"):
        exp = get_preset(preset)
        exp.validate()
        for e in exp.datasets:
            lr, batch, wd, temp, a, b1, b2 = table[e.arch]
            for section in ("teach", "distill"):
                cfg = exp.stage(section, e.name)
                opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg)
                group = opt.param_groups[0]
                assert (group["lr"], group["weight_decay"], cfg.batch_size) == (lr, wd, batch)
            d = exp.stage("distill", e.name)
            assert (d.temperature, d.soft_weight, list(d.level_weights)) == (temp, a, [b1, b2])
            seen.add(e.arch)
    assert seen == set(table)


def test_dataset_values_override_the_section_and_the_command_line_wins():
    from mlfd.config import DatasetEntry, Experiment
    from mlfd.errors import MlfdError

    exp = Experiment(datasets=[DatasetEntry("a", "a", "test_resnet", teach={"lr": 5e-5}),
                               DatasetEntry("b", "b", "test_vit")])
    exp.validate()
    assert exp.stage("teach", "a").lr == 5e-5 and exp.stage("teach", "b").lr == exp.teach.lr
    assert exp.stage("teach", "a").epochs == exp.teach.epochs  # the rest is the section's
    exp.override(lr=0.01, epochs=None)
    assert exp.stage("teach", "a").lr == 0.01 and exp.stage("distill", "b").lr == 0.01
    exp.datasets[1].distill = {"temprature": 3}
    with pytest.raises(MlfdError, match=r"datasets\[b\]\.distill: unknown key\(s\) temprature"):
        exp.validate()
    exp.datasets[1].distill = {"grad_accum": 3}  # does not divide batch_size 128
    with pytest.raises(MlfdError, match=r"datasets\[b\]\.distill\.grad_accum"):
        exp.validate()


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    """grad_accum micro-batches step once with the full batch's gradient (no BatchNorm
    here, so the two are the same computation up to float rounding)."""
    import torch

    from mlfd.config import TrainConfig
    from mlfd.engine.artifact import TrainRun
    from mlfd.engine.loop import fit

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g), torch.randn(32, 1, generator=g)

    def train(accum: int, out):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 1)
        cfg = TrainConfig(epochs=2, batch_size=8, grad_accum=accum, lr=0.05, optimizer="sgd",
                          schedule="cosine", weight_decay=0.0)
        micro = cfg.micro_batch

        def step(i):
            loss = torch.nn.functional.mse_loss(model(x[i:i + micro]), y[i:i + micro])
            return loss, {}, micro

        run = TrainRun(out, {"kind": "toy"}, {"accum": accum}, model.state_dict)
        fit(title="toy", model=model, cfg=cfg, device=torch.device("cpu"),
            steps_per_epoch=32 // micro, batches=lambda e: range(0, 32, micro), step=step,
            evaluate=lambda: {"top1": 0.0}, run=run)
        return model.weight.detach().clone()

    full, accumulated = train(1, tmp_path / "a"), train(4, tmp_path / "b")
    torch.testing.assert_close(accumulated, full, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    assert not torch.allclose(full, torch.nn.Linear(5, 1).weight)  # it did train


def test_fuse_forwards_each_mixed_batch_once(ws, capsys, monkeypatch):
    """Paper 4.5 / Algorithm 1: a training batch mixes all datasets and passes the joint
    teacher once, so BatchNorm's batch statistics are those of the mixture (as when the
    targets are cached), not of one dataset at a time."""
    from helpers import run

    from mlfd.models import JointTeacher

    sizes, original = [], JointTeacher.forward

    def forward(self, feats):
        if self.training:
            sizes.append(len(feats[0]))
        return original(self, feats)

    monkeypatch.setattr(JointTeacher, "forward", forward)
    # training's forwards only: precise-BN's own pass is tests/test_bn_recalibration.py's
    monkeypatch.setattr("mlfd.engine.bn.STEPS", 0)
    code, _, err = run(capsys, "fuse", "--workdir", ws, "--levels", 2, "--force",
                       "--device", "cpu")
    assert code == 0, err
    # 48 + 48 cached training samples, batch 16: six forwards of 16 (before: twelve halves)
    assert sizes == [16] * 6


# --------------------------------------------------------------------------- import


def test_imported_teacher_replaces_training(ws, tmp_path, capsys):
    """Paper 3: the teacher training step "can be omitted". A state dict saved by another
    script (torch file, nested, DataParallel-prefixed) is evaluated and becomes the
    teacher; the same weights give the same checkpoint, so nothing downstream is redone."""
    import json

    import torch
    import yaml
    from helpers import LOCAL, bad, run
    from safetensors.torch import load_file

    from mlfd.stages.plan import plan_distill
    from mlfd.workspace import Workspace

    weights = load_file(str(ws / "teachers/alpha/last.safetensors"))
    ckpt = tmp_path / "alpha-teacher.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, ckpt)
    trained = json.loads((ws / "teachers/alpha/last.json").read_text())
    code, out, err = run(capsys, "eval", "--workdir", ws, "--json", *LOCAL)
    before = next(r for r in json.loads(out)["rows"] if r["model"] == "teacher"
                  and r["dataset"] == "alpha")

    exp = yaml.safe_load((ws / "experiment.yaml").read_text())
    exp["datasets"][0]["teacher"] = "../alpha-teacher.pth"  # relative to experiment.yaml
    (ws / "experiment.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    steps = plan_distill(Workspace.open(ws), ["alpha"], 2).steps
    assert steps[0].verb == "teach" and "import.sha256" in steps[0].reason
    code, _, err = run(capsys, "teach", "--workdir", ws, *LOCAL)
    assert code == 0, err
    meta = json.loads((ws / "teachers/alpha/last.json").read_text())
    assert meta["imported"] == str(ckpt) and meta["complete"]
    assert meta["sha256"] == trained["sha256"]  # the very same weights
    assert meta["metrics"]["top1"] == before["top1"]  # evaluated on import
    assert plan_distill(Workspace.open(ws), ["alpha"], 2).steps == []

    # beta's ViT weights do not fit alpha's ResNet: one line, nothing replaced
    torch.save(load_file(str(ws / "teachers/beta/last.safetensors")), ckpt)
    msg = bad(capsys, "teach", "--workdir", ws, *LOCAL)
    assert "does not fit test_resnet with 3 classes" in msg
    assert json.loads((ws / "teachers/alpha/last.json").read_text())["sha256"] == meta["sha256"]


# --------------------------------------------------------------------------- augmentation


def test_cached_views_replay_the_teachers_auto_augment(ws, capsys):
    """Students see the augmentation family teachers and baselines get: with AutoAugment
    on, cached views > 0 are AutoAugmented, and the distill pipeline renders exactly the
    pixels each cached target was computed from."""
    import numpy as np
    import torch
    import yaml
    from helpers import LOCAL, run

    from mlfd.data.sampling import train_order
    from mlfd.stages.cache import teacher_group, view_augment
    from mlfd.stages.common import RunOptions, input_spec, load_teacher, pipeline_for
    from mlfd.workspace import Workspace

    exp = yaml.safe_load((ws / "experiment.yaml").read_text())
    exp["teach"]["auto_augment"] = "imagenet"
    (ws / "experiment.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    w = Workspace.open(ws)
    assert teacher_group(w, 2, "alpha", "train").fingerprint["auto_augment"] == "imagenet"
    assert "auto_augment" not in teacher_group(w, 2, "alpha", "test").fingerprint
    code, _, err = run(capsys, "cache", "--workdir", ws, "--levels", 2, *LOCAL)
    assert code == 0, err

    opts = RunOptions(device=torch.device("cpu"), pipeline="torch")
    cached = teacher_group(w, 2, "alpha", "train").load(["alpha"])["alpha"]
    teacher, _ = load_teacher(w, "alpha", opts.device)
    order = train_order(48, 3, w.exp.seed, 4)[:16]  # what distill epoch 3 would draw
    spec = input_spec(w, "alpha")
    for policy, same in ((view_augment(w, "alpha"), True), (None, False)):
        (b,) = list(pipeline_for(w, opts, "alpha", "train", spec, order, 16, policy))
        with torch.no_grad():
            feats = teacher(b.images, 2)[1][1].numpy().astype(np.float16)
        match = np.isclose(feats, cached[order[:, 0], order[:, 1]], rtol=1e-2, atol=1e-2)
        rows = match.reshape(16, -1).all(1)
        if same:  # every sample, augmented or clean, matches its cached target
            assert rows.all()
        else:  # without the policy, the augmented views no longer match
            assert not rows[order[:, 1] > 0].all()


def test_teach_import_option_records_only_the_checkpoint(ws, tmp_path, capsys):
    import json

    import yaml
    from helpers import LOCAL, bad, run
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "alpha.safetensors"
    save_file(load_file(str(ws / "teachers/alpha/last.safetensors")), str(ckpt))
    before = yaml.safe_load((ws / "experiment.yaml").read_text())
    code, out, err = run(capsys, "teach", "--workdir", ws, "--import", f"alpha={ckpt}",
                         "--epochs", 5, "--json", *LOCAL)
    assert code == 0, err
    assert list(json.loads(out)["trained"]) == ["alpha"]  # only the imported teacher
    after = yaml.safe_load((ws / "experiment.yaml").read_text())
    assert after["datasets"][0]["teacher"] == str(ckpt)
    after["datasets"][0]["teacher"] = None
    assert after == before  # --epochs 5 was this run's, not the experiment's
    assert "does not fit test_vit" in bad(capsys, "teach", "--workdir", ws, "--import",
                                          f"beta={ckpt}", *LOCAL)
    assert "gamma" in bad(capsys, "teach", "--workdir", ws, "--import", f"gamma={ckpt}", *LOCAL)


def test_an_up_to_date_baseline_is_kept(ws, capsys):
    import json

    from helpers import LOCAL, run

    args = ["teach", "--workdir", ws, "--baseline", "joint-head", "--arch", "test_resnet",
            "--json", *LOCAL]
    code, out, err = run(capsys, *args)
    assert code == 0 and json.loads(out)["metrics"], err
    sha = json.loads((ws / "baselines/joint-head-test_resnet/last.json").read_text())["sha256"]
    code, out, err = run(capsys, *args)
    assert code == 0 and "up to date" in err and json.loads(out)["metrics"] == {}
    code, out, err = run(capsys, *args, "--force")
    assert code == 0 and json.loads(out)["metrics"]
    assert json.loads((ws / "baselines/joint-head-test_resnet/last.json").read_text())[
        "sha256"] == sha  # retrained from the same seed: the same weights


def test_trio_preset_reads_the_full_offline_sets(shared_data):
    """`trio`: the full MNIST / Fashion-MNIST / Animal-MNIST files, three families."""
    from mlfd.presets import get_preset
    from mlfd.stages.common import dataset_of
    from mlfd.workspace import Workspace

    exp = get_preset("trio")
    exp.validate()
    ws = Workspace(shared_data, exp, str(shared_data))
    sizes = {n: len(dataset_of(ws, n).load("train")) for n in exp.names()}
    assert sizes["mnist"] == 50000 and sizes["fashion-mnist"] == 60000
    assert sizes["animal-mnist"] > 5000
    assert len({e.arch.split("_")[1] for e in exp.datasets}) == 3  # efficientnet, convnext, vit
