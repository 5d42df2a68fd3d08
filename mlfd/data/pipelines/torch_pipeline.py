"""Pure-torch backend: batched ``grid_sample`` for arrays, PIL decoding in DataLoader
workers for files; AutoAugment with torchvision's functional ops (the reference)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch

from ...errors import MlfdError
from .. import auto_augment as aa
from .. import formats
from ..views import view_params
from .base import Batch, PipelineBase, _resident, check_auto_augment_channels, render


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
