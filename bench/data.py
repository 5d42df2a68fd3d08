"""Data-pipeline throughput (images/s) at model input size 224.

Rows:
* ``jpeg``: ImageFolder of JPEGs (random crops of scikit-learn's two 427x640 sample
  photos, ~300-640 px a side, re-encoded at quality 90) -> random-resized-crop 224 +
  flip + normalise.
* ``array``: in-memory uint8 32x32 RGB images -> random-resized-crop 224 + flip + normalise.

Backends: mlfd's DALI pipeline on the GPU and on the CPU, mlfd's torch pipeline, and a
reference ``torch.utils.data.DataLoader`` with PIL + torchvision.transforms.v2 and one
worker per core. Throughput is measured over full passes after a warm-up pass (which
absorbs pipeline builds and worker start-up); GPU rows include the copy to the device
and end with a synchronise.

    python bench/data.py            # full run; writes bench/results/data-<device>-<date>.json
    python bench/data.py --quick    # small run (< 2 min on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import mlfd  # noqa: F401  (torchvision is imported later, after mlfd's CPU-torch shim)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 224


class _Split:
    def __init__(self, labels, images=None, files=None):
        self.labels, self.images, self.files = labels, images, files


PHOTOS = {"source": "scikit-learn sample images (china.jpg, flower.jpg)"}


def _photos() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:  # `pip install -e .[bench]` has it; the CI's plumbing check does not
        PHOTOS["source"] = "synthetic 427x640 gradients + noise (scikit-learn not installed)"
        print(f"note: photos are {PHOTOS['source']}: decode rates are not comparable")
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:427, 0:640]
        return [np.clip(np.stack([xx / 2.5, yy / 1.7, (xx + yy) / 4.2], -1) * (k + 1) % 256
                        + rng.normal(0, 12, (427, 640, 3)), 0, 255).astype(np.uint8)
                for k in range(2)]
    return [np.asarray(im, dtype=np.uint8) for im in load_sample_images().images]


def make_jpegs(root: Path, n: int, seed: int = 0) -> list[str]:
    """n JPEGs cut at random offsets/sizes from the sample photos, 8 class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    files = []
    for i in range(n):
        ph = photos[i % len(photos)]
        H, W = ph.shape[:2]
        h, w = int(rng.integers(300, H + 1)), int(rng.integers(400, W + 1))
        y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        d = root / f"class{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:05d}.jpg"
        Image.fromarray(ph[y:y + h, x:x + w]).save(path, quality=90)
        files.append(str(path))
    return files


def make_arrays(n: int, seed: int = 0) -> np.ndarray:
    """n 32x32 RGB images: random crops of the sample photos, downsampled."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    out = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        ph = photos[i % len(photos)]
        s = int(rng.integers(64, 400))
        y, x = int(rng.integers(0, ph.shape[0] - s + 1)), int(rng.integers(0, ph.shape[1] - s + 1))
        out[i] = np.asarray(Image.fromarray(ph[y:y + s, x:x + s]).resize((32, 32), Image.BILINEAR))
    return out


def _timed_passes(make_iter, device: torch.device, passes: int) -> tuple[int, float]:
    """Run one warm-up pass, then time `passes` passes; returns (images, seconds)."""
    def one_pass():
        n = 0
        for x in make_iter():
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n

    one_pass()
    t0 = time.perf_counter()
    n = sum(one_pass() for _ in range(passes))
    return n, time.perf_counter() - t0


def bench_mlfd(split, backend: str, device: torch.device, batch_size: int, passes: int):
    from mlfd.data.pipelines import InputSpec, build_pipeline
    from mlfd.data.sampling import train_order

    spec = InputSpec(size=(SIZE, SIZE), channels=3, mean=MEAN, std=STD)
    order = train_order(len(split.labels), epoch=0, seed=0, views="fresh")  # crop + flip views
    p = build_pipeline(split, spec, order, batch_size, backend=backend, seed=0, device=device)
    return _timed_passes(lambda: (b.images for b in p), device, passes), p


class _TVDataset(torch.utils.data.Dataset):
    """PIL decode (files) or PIL wrap (arrays), then a torchvision v2 transform."""

    def __init__(self, files, images, labels, tf):
        self.files, self.images, self.labels, self.tf = files, images, labels, tf

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        if self.files is not None:
            with Image.open(self.files[i]) as im:
                img = im.convert("RGB")
        else:
            img = Image.fromarray(self.images[i])
        return self.tf(img), int(self.labels[i])


def bench_torchvision(split, device: torch.device, batch_size: int, passes: int, workers: int):
    from torchvision.transforms import v2

    tf = v2.Compose([
        v2.RandomResizedCrop(SIZE, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])
    ds = _TVDataset(split.files, split.images, split.labels, tf)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda")

    def batches():
        for x, _ in loader:
            yield x.to(device, non_blocking=True)

    return _timed_passes(batches, device, passes)


def machine_info() -> dict:
    from mlfd.info import cpu_model

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()}


def versions() -> dict:
    import PIL
    import torchvision

    try:
        import nvidia.dali as dali
        dali_v = dali.__version__
    except Exception:  # report the absence, the DALI rows are skipped
        dali_v = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "dali": dali_v, "numpy": np.__version__,
            "pillow": PIL.__version__}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few images/passes (< 2 min on 2 cores)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/data-<device>-<date>.json)")
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args(argv)
    # PIL's read-only arrays make torch warn once per DataLoader worker; noise in a table
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    n_files, n_arrays, passes, bs = (128, 512, 2, 64) if args.quick else (512, 4096, 3, 128)
    bs = args.batch_size or bs
    cores = os.cpu_count() or 1
    has_cuda = torch.cuda.is_available()
    from mlfd.data.pipelines import dali_available

    has_dali = dali_available()
    info, vers = machine_info(), versions()

    tmp = tempfile.TemporaryDirectory(prefix="mlfd-bench-data-")
    files = make_jpegs(Path(tmp.name), n_files)
    jpeg = _Split(np.arange(n_files) % 8, files=files)
    arrays = _Split(np.arange(n_arrays) % 8, images=make_arrays(n_arrays))
    src = {"jpeg": "crops of 427x640 photos, 300-427 x 400-640 px, q90", "array": "32x32 RGB"}

    rows, skipped = [], []

    def add(path, backend, device, workers, result):
        n, secs = result
        rows.append({"path": path, "backend": backend, "device": str(device), "source": src[path],
                     "image_size": SIZE, "batch_size": bs, "workers": workers, "images": n,
                     "seconds": round(secs, 3), "images_per_s": round(n / secs, 1)})
        r = rows[-1]
        print(f"  {path:<6} {backend:<24} {r['images_per_s']:>10.1f} img/s", flush=True)

    cpu = torch.device("cpu")
    gpu = torch.device("cuda", 0) if has_cuda else None
    print(f"{info['cpu']} ({cores} cores), GPU: {info['gpu'] or 'none'}", flush=True)
    # Forking DataLoader workers comes first, before DALI starts its threads.
    for path, split in (("jpeg", jpeg), ("array", arrays)):
        dev = gpu or cpu
        add(path, "torchvision-dataloader", dev, cores,
            bench_torchvision(split, dev, bs, passes, cores))
        res, _ = bench_mlfd(split, "torch", dev, bs, passes)
        add(path, "mlfd-torch", dev, cores if path == "jpeg" else 0, res)
    for path, split in (("jpeg", jpeg), ("array", arrays)):
        if not has_dali:
            skipped.append(f"{path} dali-*: nvidia-dali not importable")
            continue
        if has_cuda:
            res, p = bench_mlfd(split, "dali", gpu, bs, passes)
            add(path, "dali-gpu", gpu, p.num_threads, res)
        else:
            skipped.append(f"{path} dali-gpu: no CUDA device on this machine")
        res, p = bench_mlfd(split, "dali", cpu, bs, passes)
        add(path, "dali-cpu", cpu, p.num_threads, res)
    tmp.cleanup()

    today = _dt.date.today().isoformat()
    slug = _slug(info["gpu"]) if info["gpu"] else "cpu-" + _slug(info["cpu"])
    out = args.out or Path(__file__).resolve().parent / "results" / f"data-{slug}-{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "data", "date": today, "quick": args.quick, "machine": info,
           "versions": vers, "passes": passes, "photos": PHOTOS["source"], "rows": rows,
           "not_run": skipped}
    out.write_text(json.dumps(doc, indent=2) + "\n")

    print(f"\n{'path':<6} {'backend':<24} {'device':<8} {'size':>4} {'batch':>5} {'img/s':>10}")
    for r in rows:
        print(f"{r['path']:<6} {r['backend']:<24} {r['device']:<8} {r['image_size']:>4} "
              f"{r['batch_size']:>5} {r['images_per_s']:>10.1f}")
    for s in skipped:
        print(f"not run: {s}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
