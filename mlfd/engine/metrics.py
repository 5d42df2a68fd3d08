"""Top-k accuracy and JSONL metric logs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return {k: int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks}


# Top-5 is reported only when it can miss: with 5 classes or fewer every label is in the top 5.
TOP5_MIN_CLASSES = 6


class Accuracy:
    """Running top-1/top-5 over batches of logits.

    ``result()["top5"]`` is ``None`` (JSON null) when the logits have fewer than
    :data:`TOP5_MIN_CLASSES` columns: with <= 5 classes top-5 is trivially 100 %, so no number
    is reported rather than a meaningless one. ``top1`` and ``n`` are always numbers.
    """

    def __init__(self):
        self.n = 0
        self.hits = {1: 0, 5: 0}
        self.num_classes: int | None = None  # logits.shape[1]; the smallest seen if they differ

    def update(self, logits, labels):
        c = int(logits.shape[1])
        self.num_classes = c if self.num_classes is None else min(self.num_classes, c)
        for k, v in topk_correct(logits, labels).items():
            self.hits[k] += v
        self.n += labels.shape[0]

    def result(self) -> dict[str, float | int | None]:
        n = max(self.n, 1)
        few = self.num_classes is not None and self.num_classes < TOP5_MIN_CLASSES
        return {"top1": self.hits[1] / n, "top5": None if few else self.hits[5] / n, "n": self.n}


class MetricsLog:
    """One JSON object per line; a fresh run of a stage starts a fresh file."""

    def __init__(self, path: Path, fresh: bool = True):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():
            path.unlink()

    def keep_epochs(self, epochs: int) -> None:
        """Drop rows of epochs after ``epochs`` (written after the last resumable checkpoint)."""
        rows = [r for r in read_jsonl(self.path) if r.get("epoch", 0) <= epochs]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in rows))
        os.replace(tmp, self.path)

    def write(self, **row) -> None:
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
