"""Data pipelines: (index, view) pairs in, normalised batches out.

The interface every backend implements (``TorchPipeline`` here; the DALI pipeline
plugs in beside it through :func:`build_pipeline`):

* constructed from a :class:`~mlfd.data.registry.Split`, an :class:`InputSpec`, an
  (M, 2) int64 array of (sample index, view id) pairs, a batch size, the view seed and
  :class:`~mlfd.data.views.ViewConfig`, and a device;
* ``len(p)`` is the number of batches; iterating yields :class:`Batch` objects that
  cover the pairs in order, the last batch possibly partial;
* optional ``auto_augment`` (``None`` or ``"imagenet"``), the same in every backend.

AutoAugment (ImageNet policy, the 25 sub-policies of Cubuk et al. 2019; see
auto_augment.py): applied only to samples whose view id is > 0 (view 0, the clean eval
view, keeps exactly the pixels it has without it). Order, in every backend: replayable
geometry (crop, resize, flip) -> round to uint8 -> AutoAugment -> channel matching ->
normalisation, so samples of views > 0 are 8-bit rounded even when no op fires.
Geometric ops fill with grey 128, resample bilinearly and translate by at most 150/331
of the output size (torchvision's ImageNet ranges). A grayscale source is augmented as
grayscale (every op keeps equal channels equal; Color leaves one channel alone, as
torchvision does).

AutoAugment is replayable: its random decisions (sub-policy, which steps fire, signs)
are drawn on the host from (seed, index, view) by ``auto_augment.draw``, never from a
global generator, so a view > 0 has the same pixels in any run, stage, batch size or
order, and a cache filled with augmented views can be replayed by the distillation
pipeline. Both backends apply the same resolved steps; this one with torchvision's
functional ops on uint8 (their outputs are the reference the DALI backend matches).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MlfdError
from . import auto_augment as aa
from . import formats
from .views import ViewConfig, view_params


def check_auto_augment(policy: str | None) -> str | None:
    """The canonical policy name, or None; anything else is a one-line MlfdError."""
    if policy is None:
        return None
    name = policy.lower() if isinstance(policy, str) else None
    if name not in aa.POLICIES:
        raise MlfdError(f"unknown auto_augment policy {policy!r}: choose "
                        f"{' or '.join(aa.POLICIES)} or leave it off")
    return name


def check_auto_augment_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise MlfdError(f"auto_augment needs 1- or 3-channel images, got {channels} channels")


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
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Crop boxes -> bilinear resize to spec.size -> flip -> [augment] -> channels -> normalise.

    ``images`` is uint8 (B, H, W, C); box arrays are per sample in source pixels.
    One batched ``grid_sample`` does crop, resize and flip (see views.py for the
    sampling convention it implements). ``augment`` maps the resampled (B, C, H, W)
    float batch in [0, 1] to another (see :func:`auto_augment_views`).
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
    if augment is not None:
        x = augment(x)
    x = match_channels(x, spec.channels)
    mean, std = _stats(spec, x.shape[1], dev)
    x = (x - mean) / std
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def auto_augment_views(x: torch.Tensor, *, policy: str, seed: int, index: np.ndarray,
                       view: np.ndarray) -> torch.Tensor:
    """AutoAugment the rows of a resampled batch whose view id is > 0.

    ``x`` is float (B, C, H, W) in [0, 1]; augmented rows are rounded to uint8 (the
    policy's ops are defined on 8-bit images) and come back as float in [0, 1]; rows of
    view 0 are returned untouched. The steps come from ``auto_augment.plan``, so they
    depend on (seed, index, view) only.
    """
    steps = aa.plan(policy, seed, index, view, x.shape[2], x.shape[3])
    rows = np.flatnonzero(steps.active)
    if len(rows) == 0:
        return x
    check_auto_augment_channels(x.shape[1])
    x = x.clone()
    for r in rows.tolist():
        u8 = x[r].mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        for op, param in zip(steps.op[r].tolist(), steps.param[r].tolist(), strict=True):
            if op >= 0:
                u8 = apply_op(u8, aa.OPS[op], param)
        x[r] = u8.float().div_(255.0)
    return x


def apply_op(img: torch.Tensor, op: str, param: float) -> torch.Tensor:
    """One AutoAugment step on a uint8 (C, H, W) image, as torchvision's v2.AutoAugment does it."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF  # after mlfd's torchvision shim

    geo = dict(interpolation=InterpolationMode.BILINEAR, fill=float(aa.FILL))
    if op == "Rotate":
        return TF.rotate(img, angle=param, **geo)
    if op in ("ShearX", "ShearY"):
        shear = [aa.shear_degrees(param), 0.0] if op == "ShearX" else [0.0, aa.shear_degrees(param)]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0],
                         **geo)
    if op in ("TranslateX", "TranslateY"):
        move = [int(param), 0] if op == "TranslateX" else [0, int(param)]
        return TF.affine(img, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0], **geo)
    if op == "Brightness":
        return TF.adjust_brightness(img, param)
    if op == "Color":
        return TF.adjust_saturation(img, param)
    if op == "Contrast":
        return TF.adjust_contrast(img, param)
    if op == "Sharpness":
        return TF.adjust_sharpness(img, param)
    if op == "Posterize":
        return TF.posterize(img, int(param))
    if op == "Solarize":
        return TF.solarize(img, param)
    if op == "AutoContrast":
        return TF.autocontrast(img)
    if op == "Equalize":
        return TF.equalize(img)
    if op == "Invert":
        return TF.invert(img)
    raise ValueError(f"unknown AutoAugment op {op!r}")


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


class PipelineBase:
    """What every backend shares: argument checks, the pairs to visit, batch count."""

    name = "base"

    def __init__(self, split, spec: InputSpec, order: np.ndarray, batch_size: int, *,
                 seed: int = 0, view_cfg: ViewConfig | None = None,
                 device: torch.device | str = "cpu", num_workers: int | None = None,
                 auto_augment: str | None = None):
        if batch_size < 1:
            raise MlfdError(f"batch size must be >= 1, got {batch_size}")
        self.auto_augment = check_auto_augment(auto_augment)
        self.split, self.spec = split, spec
        self.order = np.asarray(order, dtype=np.int64).reshape(-1, 2)
        self.batch_size, self.seed = batch_size, seed
        self.view_cfg = view_cfg or ViewConfig()
        self.device = torch.device(device)
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))
        self.num_workers = num_workers if num_workers and num_workers > 0 else min(
            4, os.cpu_count() or 1)

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size


class TorchPipeline(PipelineBase):
    """Pure-torch backend: batched grid_sample for arrays, PIL decoding for files."""

    name = "torch"

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
            x = render(data.index_select(0, sel), p.y0, p.x0, p.h, p.w, p.flip, self.spec,
                       _augmenter(self.auto_augment, self.seed, idx, view))
            yield Batch(x, self.labels[idx].to(self.device), torch.from_numpy(idx),
                        torch.from_numpy(view))

    def _iter_files(self):
        ds = _FileViews(self.split.files, self.order, self.seed, self.view_cfg, self.spec,
                        self.auto_augment)
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


def _augmenter(policy: str | None, seed: int, index: np.ndarray, view: np.ndarray):
    if policy is None:
        return None
    return partial(auto_augment_views, policy=policy, seed=seed, index=index, view=view)


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
            # "mlfd.errors.MlfdError: ..." or a subclass's name, then the message
            raise MlfdError(re.sub(r"^[A-Za-z_][\w.]*: ", "", last, count=1)) from None
        yield item


def decode_image(path: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode one file to uint8 (H, W, C) as the DALI backend does (16-bit samples scaled
    by 1/257); an unusable file (over ``max_pixels`` too) is an error naming it."""
    return formats.read_image(path, max_pixels)


class _FileViews(torch.utils.data.Dataset):
    def __init__(self, files, order, seed, view_cfg, spec, auto_augment=None):
        self.files, self.order, self.seed = files, order, seed
        self.view_cfg, self.spec, self.auto_augment = view_cfg, spec, auto_augment
        self.max_pixels = formats.max_image_pixels()  # workers get it even when spawned

    def __len__(self):
        return len(self.order)

    def __getitem__(self, pos):
        idx, view = self.order[pos]
        img = decode_image(self.files[idx], self.max_pixels)
        p = view_params(self.seed, np.array([idx]), np.array([view]), img.shape[0], img.shape[1],
                        self.view_cfg)
        x = render(torch.from_numpy(img)[None], p.y0, p.x0, p.h, p.w, p.flip, self.spec,
                   _augmenter(self.auto_augment, self.seed, np.array([idx]), np.array([view])))
        return x[0], pos


PIPELINES = {"torch": TorchPipeline}


def dali_available() -> bool:
    try:
        from . import dali_pipeline  # noqa: F401
    except Exception:
        return False
    return True


def resolve_pipeline(backend: str | None) -> str:
    """The backend ``auto`` stands for without a fast-path verdict: DALI where it imports."""
    backend = (backend or "auto").lower()
    if backend == "auto":
        return "dali" if "dali" in PIPELINES or dali_available() else "torch"
    return backend


class _OnDevice:
    """A CPU pipeline whose batches move to ``device`` (``dali-cpu`` on a CUDA run)."""

    def __init__(self, pipe, device):
        self.pipe, self.device, self.name = pipe, torch.device(device), f"{pipe.name}-cpu"

    def __len__(self) -> int:
        return len(self.pipe)

    def __iter__(self) -> Iterator[Batch]:
        for b in self.pipe:
            yield Batch(b.images.to(self.device, non_blocking=True), b.labels.to(self.device),
                        b.index, b.view)


def build_pipeline(split, spec: InputSpec, order: np.ndarray, batch_size: int, *, backend: str = "auto",
                   seed: int = 0, view_cfg: ViewConfig | None = None, device="cpu",
                   auto_augment: str | None = None, **kw):
    """The pipeline seam: ``auto`` prefers DALI where it imports, else torch; ``dali-cpu``
    is DALI's CPU mode whatever the device (mlfd.fastpaths' fallback from GPU decoding).

    ``auto_augment`` (None or "imagenet") is passed to the backend; see the module
    docstring for where it applies.
    """
    auto_augment = check_auto_augment(auto_augment)  # fail before importing a backend
    backend = resolve_pipeline(backend)
    if backend == "dali-cpu":
        return _OnDevice(build_pipeline(split, spec, order, batch_size, backend="dali", seed=seed,
                                        view_cfg=view_cfg, device="cpu",
                                        auto_augment=auto_augment, **kw), device)
    if backend == "dali" and "dali" not in PIPELINES and not dali_available():
        raise MlfdError("--pipeline dali: nvidia-dali is not importable here; use --pipeline torch")
    if backend not in PIPELINES:
        raise MlfdError(f"unknown pipeline {backend!r}: choose auto, dali or torch")
    if auto_augment is not None:
        kw["auto_augment"] = auto_augment  # None is not passed: third-party backends stay valid
    return PIPELINES[backend](split, spec, order, batch_size, seed=seed, view_cfg=view_cfg,
                              device=device, **kw)
