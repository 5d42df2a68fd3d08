"""Degenerate data: fewer than two classes is refused; top-5 is withheld below six classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlfd.data import datasets
from mlfd.engine.metrics import Accuracy, topk_correct
from mlfd.errors import MlfdError


def save_png(path: Path, mode: str = "RGB", size=(6, 5), value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def write_npz(path: Path, y_train, y_test, **extra) -> Path:
    np.savez(
        path,
        x_train=np.zeros((len(y_train), 4, 4), np.uint8),
        y_train=np.asarray(y_train),
        x_test=np.zeros((len(y_test), 4, 4), np.uint8),
        y_test=np.asarray(y_test),
        **extra,
    )
    return path


# ----------------------------------------------------------------------------- datasets


def test_one_class_npz_is_refused(tmp_path):
    path = write_npz(tmp_path / "one.npz", [0, 0, 0], [0])
    with pytest.raises(MlfdError, match="at least 2") as err:
        datasets.get_dataset(path)
    message = str(err.value)
    assert "has 1 class;" in message and str(path) in message and "\n" not in message


def test_one_class_npz_with_class_names_is_refused(tmp_path):
    path = write_npz(tmp_path / "named.npz", [0, 0], [0], classes=np.array(["cat"]))
    with pytest.raises(MlfdError, match="has 1 class; classification needs at least 2"):
        datasets.get_dataset(path)


def test_npz_train_labels_of_one_class_are_refused(tmp_path):
    # Two classes overall (test has a 1), but the train split only ever shows class 0.
    path = write_npz(tmp_path / "skewed.npz", [0, 0, 0], [0, 1])
    with pytest.raises(MlfdError, match="at least 2") as err:
        datasets.get_dataset(path)
    message = str(err.value)
    assert str(path) in message and "1 class in y_train (2 declared)" in message
    # Same when the file declares class names that the train labels do not cover.
    named = write_npz(tmp_path / "named2.npz", [1, 1], [0, 1], classes=np.array(["a", "b"]))
    with pytest.raises(MlfdError, match="1 class in y_train"):
        datasets.get_dataset(named)


def test_two_class_npz_is_accepted(tmp_path):
    ds = datasets.get_dataset(write_npz(tmp_path / "two.npz", [0, 1, 1], [1]))
    assert ds.num_classes == 2 and ds.load("train").labels.tolist() == [0, 1, 1]


def test_one_class_image_folder_is_refused(tmp_path):
    root = tmp_path / "single"
    save_png(root / "train" / "only" / "a.png")
    save_png(root / "train" / "only" / "b.png")
    save_png(root / "test" / "only" / "c.png")
    with pytest.raises(MlfdError, match="at least 2") as err:
        datasets.get_dataset(root)
    message = str(err.value)
    assert "has 1 class;" in message and str(root.resolve()) in message and "\n" not in message


def test_two_class_image_folder_is_accepted(tmp_path):
    root = tmp_path / "pair"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            save_png(root / split / cls / "x.png")
    assert datasets.get_dataset(root).classes == ["a", "b"]


def test_one_class_csv_list_is_refused(tmp_path):
    save_png(tmp_path / "img" / "a.png")
    save_png(tmp_path / "img" / "b.png")
    listing = tmp_path / "one.csv"
    listing.write_text("path,label,split\nimg/a.png,dog,train\nimg/b.png,dog,test\n")
    with pytest.raises(MlfdError, match="has 1 class; classification needs at least 2"):
        datasets.get_dataset(listing)


def test_dataset_built_directly_is_checked():
    split = datasets.Split(labels=[0], images=np.zeros((1, 2, 2, 1), np.uint8))
    with pytest.raises(MlfdError, match="'toy' has 0 classes; classification needs at least 2"):
        datasets.Dataset("toy", [], 1, (2, 2), (0.5,), (0.5,), "toy", "none",
                         loader=lambda s: split)


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_three_classes_has_no_top5():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0],  # argmax 1, label 1: hit
            [0.8, 0.05, 0.15],  # argmax 0, label 2: miss
            [0.2, 0.3, 0.5],  # argmax 2, label 2: hit
            [0.6, 0.3, 0.1],  # argmax 0, label 1: miss
        ]
    )
    labels = torch.tensor([1, 2, 2, 1])
    acc = Accuracy()
    acc.update(logits[:2], labels[:2])
    acc.update(logits[2:], labels[2:])
    result = acc.result()
    assert result == {"top1": 0.5, "top5": None, "n": 4}
    assert json.loads(json.dumps(result))["top5"] is None  # JSON null
    # The helper itself still counts (k capped at C) for callers that want the raw numbers.
    assert topk_correct(logits, labels) == {1: 2, 5: 4}


def test_accuracy_ten_classes_top5_by_hand():
    # Logits are a fixed ranking per row: column order from most to least likely.
    rankings = [
        [3, 1, 4, 0, 5, 9, 2, 6, 8, 7],  # label 3: rank 1 -> top-1 and top-5 hit
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # label 4: rank 5 -> top-5 hit only
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],  # label 4: rank 6 -> miss both
        [2, 7, 1, 8, 6, 0, 3, 4, 5, 9],  # label 2: rank 1 -> top-1 and top-5 hit
        [5, 4, 3, 2, 1, 0, 6, 7, 8, 9],  # label 1: rank 5 -> top-5 hit only
    ]
    logits = torch.zeros(len(rankings), 10)
    for row, order in enumerate(rankings):
        for rank, cls in enumerate(order):
            logits[row, cls] = 10.0 - rank
    labels = torch.tensor([3, 4, 4, 2, 1])
    acc = Accuracy()
    acc.update(logits, labels)
    assert acc.result() == {"top1": 2 / 5, "top5": 4 / 5, "n": 5}


def test_accuracy_boundary_five_and_six_classes():
    five, six = Accuracy(), Accuracy()
    five.update(torch.eye(5), torch.arange(5))
    six.update(torch.eye(6), torch.arange(6))
    assert five.result()["top5"] is None and five.result()["top1"] == 1.0
    assert six.result()["top5"] == 1.0
    assert Accuracy().result() == {"top1": 0.0, "top5": 0.0, "n": 0}  # nothing seen: as before
