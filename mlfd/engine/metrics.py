"""Top-k accuracy and JSONL metric logs."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import torch

from ..storage.diskio import write_text, writing


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

    def reduce(self) -> Accuracy:
        """Counts over every torchrun rank, each of which saw its shard of the test split
        (no-op in one process): every rank then has the same result."""
        from .distributed import all_reduce, world

        if world() == 1:
            return self
        n, h1, h5 = all_reduce([self.n, self.hits[1], self.hits[5]])
        self.n, self.hits = int(n), {1: int(h1), 5: int(h5)}
        # a rank with an empty shard saw no logits: the others know the class count
        c = all_reduce([self.num_classes or 2**31], "min")[0]
        self.num_classes = None if c >= 2**31 else int(c)
        return self

    def result(self) -> dict[str, float | int | None]:
        n = max(self.n, 1)
        few = self.num_classes is not None and self.num_classes < TOP5_MIN_CLASSES
        return {"top1": self.hits[1] / n, "top5": None if few else self.hits[5] / n, "n": self.n}


SUMMARY_FILE = "summary.csv"
TENSORBOARD_DIR = "tensorboard"

# Whether training runs mirror their rows to TensorBoard (`--log tensorboard`; the CLI sets it
# from RunOptions.log for the command it runs).
_MIRROR = {"tensorboard": False}


def set_tensorboard(on: bool = True) -> None:
    _MIRROR["tensorboard"] = on


def summary_columns(rows: list[dict]) -> list[str]:
    """timm's summary.csv habit: epoch, lr, the training loss terms, then test accuracy."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    train = [k for k in keys if k.startswith("train_") and k != "train_images_per_s"]
    acc = [k for k in ("top1", "top5") if k in keys]
    per = [k for k in keys if k.endswith(("/top1", "/top5"))]  # per dataset (fuse, baselines)
    return [k for k in ("epoch", "lr") if k in keys] + train + acc + per


class MetricsLog:
    """One JSON object per line; a fresh run of a stage starts a fresh file.

    Beside it, ``summary.csv`` holds the same epochs as a table (rewritten from the JSONL
    after every change, so the two never disagree); with TensorBoard mirroring on, every
    row is also written as scalars to ``tensorboard/`` in the same directory."""

    def __init__(self, path: Path, fresh: bool = True, tensorboard: bool | None = None):
        self.path = path
        self.summary = path.parent / SUMMARY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            path.unlink(missing_ok=True)
            self.summary.unlink(missing_ok=True)
        self.tensorboard = _MIRROR["tensorboard"] if tensorboard is None else tensorboard
        self._writer = None
        self._purge_step: int | None = None

    def keep_epochs(self, epochs: int) -> None:
        """Drop rows of epochs after ``epochs`` (written after the last resumable checkpoint)."""
        rows = [r for r in read_jsonl(self.path) if r.get("epoch", 0) <= epochs]
        self._write_rows(rows)
        self._purge_step = epochs + 1  # TensorBoard drops its events of the dropped epochs

    def write(self, **row) -> None:
        row = {"time": round(time.time(), 3), **row}
        self._write_rows([*read_jsonl(self.path), row])
        if self.tensorboard:
            with writing(self.path.parent / TENSORBOARD_DIR):
                self._mirror(row)

    def _write_rows(self, rows: list[dict]) -> None:
        # rewritten whole, not appended: a full disk leaves the old file, never a torn line
        write_text(self.path, "".join(json.dumps(r, default=float) + "\n" for r in rows))
        self._write_summary(rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_summary(self, rows: list[dict]) -> None:
        cols = summary_columns(rows)
        buf = io.StringIO()
        w = csv.DictWriter(buf, cols, restval="", extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in cols} for r in rows)
        write_text(self.summary, buf.getvalue())

    def _mirror(self, row: dict) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR),
                                         purge_step=self._purge_step)
        step = int(row.get("epoch", 0))
        for k, v in row.items():
            if k in ("time", "epoch", "n") or isinstance(v, bool) or \
                    not isinstance(v, (int, float)):
                continue
            tag = f"train/{k[6:]}" if k.startswith("train_") else \
                f"test/{k}" if k in ("top1", "top5") else k
            self._writer.add_scalar(tag, v, step)
        self._writer.flush()  # an interrupted run keeps the epochs it finished


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
