"""Data pipelines: (index, view) pairs in, normalised batches out.

The interface every backend implements (``TorchPipeline`` here; the DALI pipeline
plugs in beside it through :func:`build_pipeline`):

* constructed from a :class:`~mlfd.data.registry.Split`, an :class:`InputSpec`, an
  (M, 2) int64 array of (sample index, view id) pairs, a batch size, the view seed and
  :class:`~mlfd.data.views.ViewConfig`, and a device;
* ``len(p)`` is the number of batches; iterating yields :class:`Batch` objects that
  cover the pairs in order, the last batch possibly partial.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MlfdError
from .views import ViewConfig, view_params


@dataclass(frozen=True)
class InputSpec:
    """What a model wants: spatial size, channels, normalisation (per source channel)."""

    size: tuple[int, int]
    channels: int = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    channels_last: bool = False

    def to_dict(self) -> dict:
        return {"size": list(self.size), "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std)}


@dataclass
class Batch:
    images: torch.Tensor  # (B, C, H, W) float32, normalised, on the pipeline's device
    labels: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) int64 sample indices
    view: torch.Tensor  # (B,) int64 view ids

    def __len__(self) -> int:
        return self.labels.shape[0]


def render(
    images: torch.Tensor,
    y0, x0, h, w, flip,
    spec: InputSpec,
) -> torch.Tensor:
    """Crop boxes -> bilinear resize to spec.size -> flip -> channels -> normalise.

    ``images`` is uint8 (B, H, W, C); box arrays are per sample in source pixels.
    One batched ``grid_sample`` does crop, resize and flip (see views.py for the
    sampling convention it implements).
    """
    B, H, W, C = images.shape
    dev = images.device
    f = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), device=dev)  # noqa: E731
    y0, x0, h, w = f(y0), f(x0), f(h), f(w)
    sx = w / W * torch.where(torch.as_tensor(np.asarray(flip), device=dev), -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, dtype=torch.float64, device=dev)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * x0 + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * y0 + h) / H - 1
    out_h, out_w = spec.size
    grid = F.affine_grid(theta.float(), [B, C, out_h, out_w], align_corners=False)
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = match_channels(x, spec.channels)
    mean, std = _stats(spec, x.shape[1], dev)
    x = (x - mean) / std
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grayscale to RGB by replication; RGB to grayscale by ITU-R 601 luma."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1 and c == 3:
        wts = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        return (x * wts).sum(1, keepdim=True)
    raise MlfdError(f"cannot map {c}-channel images to a {channels}-channel model")


def _stats(spec: InputSpec, channels: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    def fit(v):
        v = list(v)
        if len(v) == channels:
            return v
        if len(v) == 1:
            return v * channels
        return [float(np.mean(v))] * channels  # RGB stats on a grayscale model
    mean = torch.tensor(fit(spec.mean), device=dev).view(1, -1, 1, 1)
    std = torch.tensor(fit(spec.std), device=dev).view(1, -1, 1, 1)
    return mean, std


_RESIDENT: dict[tuple[int, str], torch.Tensor] = {}


def _resident(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Keep each in-memory split on the device once (GPU-resident small datasets)."""
    key = (id(images), str(device))
    t = _RESIDENT.get(key)
    if t is None:
        if len(_RESIDENT) > 16:
            _RESIDENT.clear()
        t = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        _RESIDENT[key] = t
    return t


class TorchPipeline:
    """Pure-torch backend: batched grid_sample for arrays, PIL decoding for files."""

    name = "torch"

    def __init__(self, split, spec: InputSpec, order: np.ndarray, batch_size: int, *,
                 seed: int = 0, view_cfg: ViewConfig | None = None,
                 device: torch.device | str = "cpu", num_workers: int | None = None):
        if batch_size < 1:
            raise MlfdError(f"batch size must be >= 1, got {batch_size}")
        self.split, self.spec, self.order = split, spec, np.asarray(order, dtype=np.int64)
        self.batch_size, self.seed = batch_size, seed
        self.view_cfg = view_cfg or ViewConfig()
        self.device = torch.device(device)
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))
        if num_workers is None:
            import os
            num_workers = min(4, os.cpu_count() or 1)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        if self.split.images is not None:
            yield from self._iter_arrays()
        else:
            yield from self._iter_files()

    def _iter_arrays(self):
        data = _resident(self.split.images, self.device)
        H, W = data.shape[1:3]
        for start in range(0, len(self.order), self.batch_size):
            pairs = self.order[start:start + self.batch_size]
            idx, view = pairs[:, 0], pairs[:, 1]
            p = view_params(self.seed, idx, view, H, W, self.view_cfg)
            sel = torch.from_numpy(idx).to(self.device)
            x = render(data.index_select(0, sel), p.y0, p.x0, p.h, p.w, p.flip, self.spec)
            yield Batch(x, self.labels[idx].to(self.device), torch.from_numpy(idx),
                        torch.from_numpy(view))

    def _iter_files(self):
        ds = _FileViews(self.split.files, self.order, self.seed, self.view_cfg, self.spec)
        batches = [list(range(s, min(s + self.batch_size, len(self.order))))
                   for s in range(0, len(self.order), self.batch_size)]
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=self.num_workers,
            persistent_workers=False, pin_memory=self.device.type == "cuda")
        for x, pos in _reraise_worker_errors(loader):
            pairs = self.order[pos.numpy()]
            idx = pairs[:, 0]
            yield Batch(x.to(self.device, non_blocking=True), self.labels[idx].to(self.device),
                        torch.from_numpy(idx), torch.from_numpy(pairs[:, 1]))


def _reraise_worker_errors(loader):
    """DataLoader workers wrap errors in their traceback text; keep the one-line reason."""
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except MlfdError as e:
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1]
            raise MlfdError(last.split("MlfdError: ", 1)[-1]) from None
        yield item


def decode_image(path: str) -> np.ndarray:
    """Decode one file to uint8 (H, W, C); an unreadable file names itself in the error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L") if im.mode in ("L", "1", "I;16", "I") else im.convert("RGB")
            arr = np.array(im, dtype=np.uint8)  # writable: torch.from_numpy warns on read-only
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise MlfdError(f"cannot decode image {path}: {e.__class__.__name__}: {e}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


class _FileViews(torch.utils.data.Dataset):
    def __init__(self, files, order, seed, view_cfg, spec):
        self.files, self.order, self.seed = files, order, seed
        self.view_cfg, self.spec = view_cfg, spec

    def __len__(self):
        return len(self.order)

    def __getitem__(self, pos):
        idx, view = self.order[pos]
        img = decode_image(self.files[idx])
        p = view_params(self.seed, np.array([idx]), np.array([view]), img.shape[0], img.shape[1],
                        self.view_cfg)
        x = render(torch.from_numpy(img)[None], p.y0, p.x0, p.h, p.w, p.flip, self.spec)
        return x[0], pos


PIPELINES = {"torch": TorchPipeline}


def dali_available() -> bool:
    try:
        from . import dali_pipeline  # noqa: F401
    except Exception:
        return False
    return True


def build_pipeline(split, spec: InputSpec, order: np.ndarray, batch_size: int, *, backend: str = "auto",
                   seed: int = 0, view_cfg: ViewConfig | None = None, device="cpu", **kw):
    """The pipeline seam: ``auto`` prefers DALI where it imports, else torch."""
    backend = (backend or "auto").lower()
    if backend == "auto":
        backend = "dali" if "dali" in PIPELINES or dali_available() else "torch"
    if backend == "dali" and "dali" not in PIPELINES and not dali_available():
        raise MlfdError("--pipeline dali: nvidia-dali is not importable here; use --pipeline torch")
    if backend not in PIPELINES:
        raise MlfdError(f"unknown pipeline {backend!r}: choose auto, dali or torch")
    return PIPELINES[backend](split, spec, order, batch_size, seed=seed, view_cfg=view_cfg,
                              device=device, **kw)
