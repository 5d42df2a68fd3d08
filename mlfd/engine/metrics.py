"""Top-k accuracy and JSONL metric logs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return {k: int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks}


class Accuracy:
    def __init__(self):
        self.n = 0
        self.hits = {1: 0, 5: 0}

    def update(self, logits, labels):
        for k, v in topk_correct(logits, labels).items():
            self.hits[k] += v
        self.n += labels.shape[0]

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"top1": self.hits[1] / n, "top5": self.hits[5] / n, "n": self.n}


class MetricsLog:
    """One JSON object per line; a fresh run of a stage starts a fresh file."""

    def __init__(self, path: Path, fresh: bool = True):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():
            path.unlink()

    def write(self, **row) -> None:
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
