"""Schedules, top-k accuracy and checkpoints of the shared training engine."""

import math

import pytest
import torch

from mlfd.engine.checkpoint import file_sha256, load_into, load_meta, save_checkpoint
from mlfd.engine.metrics import Accuracy, topk_correct
from mlfd.engine.optim import lr_factor
from mlfd.errors import CorruptArtifact, MlfdError


def test_lr_schedules_by_hand():
    assert lr_factor("constant", 50, 100, 0) == 1.0
    assert lr_factor("cosine", 0, 100, 0) == 1.0
    assert lr_factor("cosine", 50, 100, 0) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100, 0) == pytest.approx(0.0, abs=1e-12)
    # Linear warm-up over 10 steps, then cosine over the remaining 90.
    assert lr_factor("cosine", 4, 100, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor("onecycle", 0, 100, 0) == pytest.approx(0.04)
    assert lr_factor("onecycle", 30, 100, 0) == pytest.approx(1.0)
    assert lr_factor("onecycle", 100, 100, 0) == pytest.approx(1e-4)
    with pytest.raises(MlfdError):
        lr_factor("triangular", 0, 10, 0)


def test_topk_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    hits = topk_correct(logits, labels, ks=(1, 2, 5))
    assert hits == {1: 1, 2: 2, 5: 3}  # k above C counts every sample
    acc = Accuracy()
    acc.update(logits, labels)
    assert acc.result() == {"top1": 1 / 3, "top5": None, "n": 3}  # top-5 of 3 classes: n/a


def test_checkpoint_round_trip_and_wrong_architecture(tmp_path):
    a = torch.nn.Linear(3, 2)
    sha = save_checkpoint(tmp_path / "m" / "last", a.state_dict(), {"arch": "linear"})
    assert sha == file_sha256(tmp_path / "m" / "last.safetensors")
    meta = load_meta(tmp_path / "m" / "last")
    assert meta["arch"] == "linear" and meta["sha256"] == sha
    b = torch.nn.Linear(3, 2)
    load_into(b, tmp_path / "m" / "last", "linear")
    assert torch.equal(a.weight, b.weight)
    with pytest.raises(MlfdError, match="does not fit"):
        load_into(torch.nn.Linear(4, 2), tmp_path / "m" / "last", "wider linear")
    (tmp_path / "m" / "last.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptArtifact, match="does not match its recorded sha256"):
        load_into(b, tmp_path / "m" / "last", "linear")
