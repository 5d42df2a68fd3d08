"""Held-out trials (issue 22 §5): multi-dataset experiments no preset was tuned on.

Each trial is built from data on disk (the embedded demo sets) into npz files, then run
with `mlfd compare` over seeds at the tool's defaults for custom experiments:

* ``small``: a 150-image, 2-class subset of Fashion-MNIST beside 600 images of MNIST and
  600 of Animal-MNIST (10 classes each), all 28 px grayscale.
* ``mixed``: 600 MNIST digits at 28 px grayscale beside a 6-class, 360-image subset of
  Animal-MNIST made RGB (each image tinted with a colour drawn per image) at 64 px.

Sized for a busy 2-core CPU (a few thousand images in all).

Teachers and students are timm's test_resnet at 32 px (one architecture: each student
meets the two same-architecture baselines). Everything is written under --work (default
/tmp/mlfd-trials); tables go into bench/results/ only with --save.

    python bench/trials.py --trial small --seeds 0 1 2 --levels 1 2
    python bench/trials.py --trial small --seeds 0 --holdout 0.2 --budget fixed   # choosing
    python bench/trials.py --trial small --seeds 0 1 2 --save                     # the tables
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRIALS = ("small", "mixed")


def _subset(x, y, classes, per_class, rng):
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in classes])
    idx = rng.permutation(idx)
    remap = {c: i for i, c in enumerate(classes)}
    return x[idx], np.array([remap[int(v)] for v in y[idx]], dtype=np.int64)


def _save(path: Path, train, test) -> Path:
    """Written beside and renamed: a trial running on the same files reads a whole one. An
    existing file is kept (npz bytes carry a timestamp: rewriting would change the data's
    fingerprint under a trial that uses it)."""
    if path.exists():
        return path
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(tmp, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1])
    os.replace(tmp, path)
    return path


def _split(name: str):
    from mlfd.data.datasets import get_dataset

    ds = get_dataset(name, None)
    tr, te = ds.load("train"), ds.load("test")
    return (np.asarray(tr.images), np.asarray(tr.labels)), (np.asarray(te.images),
                                                            np.asarray(te.labels))


def _tint(x: np.ndarray, size: int, rng) -> np.ndarray:
    """Grayscale (n, h, w, 1) -> RGB (n, size, size, 3): upsampled, each image tinted."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    colour = torch.from_numpy(rng.uniform(0.3, 1.0, (len(x), 3, 1, 1)).astype(np.float32))
    return (t * colour).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def build(trial: str, data: Path) -> list[str]:
    """The trial's npz files; returns its --teacher values."""
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    if trial == "small":
        (fx, fy), (fxt, fyt) = _split("fashion-mnist-mini")
        (mx, my), (mxt, myt) = _split("mnist-mini")
        (ax, ay), (axt, ayt) = _split("animal-mnist-mini")
        files = [
            _save(data / "fashion2.npz", _subset(fx, fy, [0, 1], 75, rng),
                  _subset(fxt, fyt, [0, 1], 50, rng)),
            _save(data / "digits.npz", _subset(mx, my, range(10), 60, rng),
                  _subset(mxt, myt, range(10), 30, rng)),
            _save(data / "animals.npz", _subset(ax, ay, range(10), 60, rng),
                  _subset(axt, ayt, range(10), 30, rng)),
        ]
    elif trial == "mixed":
        (mx, my), (mxt, myt) = _split("mnist-mini")
        (ax, ay), (axt, ayt) = _split("animal-mnist-mini")
        atr, ate = _subset(ax, ay, range(6), 60, rng), _subset(axt, ayt, range(6), 30, rng)
        files = [
            _save(data / "digits.npz", _subset(mx, my, range(10), 60, rng),
                  _subset(mxt, myt, range(10), 30, rng)),
            _save(data / "animals-rgb64.npz", (_tint(atr[0], 64, rng), atr[1]),
                  (_tint(ate[0], 64, rng), ate[1])),
        ]
    else:
        raise SystemExit(f"--trial {trial!r}: choose {', '.join(TRIALS)}")
    return [f"{f}=test_resnet" for f in files]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trial", choices=TRIALS, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    p.add_argument("--holdout", type=float, default=None,
                   help="measure on this fraction held out of train (choosing a rule)")
    p.add_argument("--budget", default=None, help="fixed | equal-images (default: the tool's)")
    p.add_argument("--work", type=Path, default=Path("/tmp/mlfd-trials"))
    p.add_argument("--save", action="store_true",
                   help="copy the tables into bench/results/trials-<trial>-<date>.{md,json}")
    args = p.parse_args()
    tag = args.trial + (f"-holdout{args.holdout:g}" if args.holdout else "") + \
        (f"-{args.budget}" if args.budget else "")
    teachers = build(args.trial, args.work / "data" / args.trial)
    workdir = args.work / tag
    cmd = [sys.executable, "-m", "mlfd_cli.main", "compare", "--workdir", str(workdir),
           "--seeds", *map(str, args.seeds), "--levels", *map(str, args.levels),
           "--input-size", "32", "--device", "cpu", "--pipeline", "torch"]
    for t in teachers:
        cmd += ["--teacher", t]
    if args.holdout:
        cmd += ["--holdout", str(args.holdout)]
    if args.budget:
        cmd += ["--budget", args.budget]
    t0 = time.perf_counter()
    env = dict(os.environ, MLFD_NO_PROGRESS="1")
    code = subprocess.call(cmd, env=env, cwd=args.work)
    wall = time.perf_counter() - t0
    if code:
        raise SystemExit(f"mlfd compare failed ({code}); log above")
    doc = json.loads((workdir / "reports" / "compare.json").read_text())
    doc.update(trial=args.trial, wall_seconds=wall, machine=platform.processor()
               or platform.machine(), cpus=os.cpu_count(), command=" ".join(cmd[2:]))
    print(f"{tag}: {wall:.0f} s")
    if args.save:
        out = ROOT / "bench" / "results" / f"trials-{tag}-{dt.date.today()}"
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str))
        shutil.copy(workdir / "reports" / "compare.md", out.with_suffix(".md"))


if __name__ == "__main__":
    main()
