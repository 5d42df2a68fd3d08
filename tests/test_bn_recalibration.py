"""Precise BatchNorm (issue 22 §2): statistics recomputed for the final weights."""

import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import LOCAL, make_npz, run

from mlfd.engine import bn


def _few_steps_model():
    """The failure of the issue in miniature: 150 images of 2 classes far from zero mean,
    6 optimiser steps at batch 128. BatchNorm's running averages (momentum 0.1) are then
    still near their initial values, and in eval mode every image gets one class."""
    torch.manual_seed(0)
    n = 150
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, 16, 16) * 0.5 + 3.0
    x[y == 1, :, 4:10, 4:10] += 4.0
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(6):
        idx = torch.randperm(n)[:128]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y


def test_a_model_at_chance_predicts_both_classes_after_recalibration():
    model, x, y = _few_steps_model()
    with torch.no_grad():
        before = model(x).argmax(1)
    assert before.unique().numel() == 1  # at chance: one class for every image
    assert (before == y).float().mean().item() == 0.5

    used = bn.recalibrate(model, [x], lambda b: (model(b), len(b))[1], max_images=1000)
    assert used == 150
    assert not model.training  # the mode it was in is restored
    with torch.no_grad():
        after = model(x).argmax(1)
        # independent computation: the conv's outputs over the same images, their channel
        # mean and unbiased variance, and the eval-mode forward written out by hand
        h = model[0](x)
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
        norm = model[1]
        z = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + norm.eps)
        z = z * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
        by_hand = model[5](F.relu(z).mean((2, 3))).argmax(1)
    torch.testing.assert_close(norm.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_var, var, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, by_hand)
    assert after.unique().numel() == 2
    assert (after == y).float().mean().item() > 0.9


def test_nothing_fed_leaves_the_statistics_as_they_were():
    model, x, _ = _few_steps_model()
    old = model[1].running_mean.clone()
    assert bn.recalibrate(model, [], lambda b: len(b)) == 0
    assert torch.equal(model[1].running_mean, old)
    assert model[1].momentum == 0.1


def test_a_teacher_with_few_steps_is_recalibrated_and_says_so(tmp_path, capsys):
    a = make_npz(tmp_path / "a.npz", 0, classes=2, n_train=40, n_test=20)
    b = make_npz(tmp_path / "b.npz", 1, classes=3, n_train=40, n_test=20)
    w = tmp_path / "w"
    code, _, err = run(capsys, "teach", "--teacher", f"{a}=test_resnet", "--teacher",
                       f"{b}=test_resnet", "--dataset", "a", "--workdir", w, "--input-size", 32,
                       "--epochs", 1, "--batch-size", 16, *LOCAL)
    assert code == 0, err
    meta = json.loads((w / "teachers" / "a" / "last.json").read_text())
    # 40 images at batch 16, 1 epoch: 3 steps, far below the threshold; every training
    # image went through the recomputation (fewer than its cap)
    assert meta["bn_recalibrated"]["steps"] == 3
    assert meta["bn_recalibrated"]["images"] == 40
    assert "BatchNorm statistics recomputed" in err
