"""Data pipelines: (index, view) pairs in, normalised batches out.

The interface every backend implements (``TorchPipeline`` in torch_pipeline.py,
``DaliPipeline`` in dali.py; :func:`mlfd.data.pipelines.build_pipeline` picks one):

* constructed from a :class:`~mlfd.data.datasets.Split`, an :class:`InputSpec`, an
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
pipeline. Both backends apply the same resolved steps; the torch one with torchvision's
functional ops on uint8 (their outputs are the reference the DALI backend matches).

This module holds what both backends share: the spec and batch types, the argument
checks, the resampling reference (:func:`render`), channel matching and statistics, and
image-size checks against the pixel limit.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import MlfdError
from .. import auto_augment as aa
from .. import formats
from ..views import ViewConfig


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


def _png_size(buf: bytes) -> tuple[int, int] | None:
    if buf[:8] != b"\x89PNG\r\n\x1a\n" or buf[12:16] != b"IHDR":
        return None
    return int.from_bytes(buf[20:24], "big"), int.from_bytes(buf[16:20], "big")


# Start-of-frame markers (baseline, progressive, lossless, arithmetic); not DHT/JPG/DAC.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(buf: bytes) -> tuple[int, int] | None:
    if buf[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        m = buf[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length field
            i += 2
            continue
        if m in _SOF:
            if i + 9 > n:
                return None
            return int.from_bytes(buf[i + 5:i + 7], "big"), int.from_bytes(buf[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    return None


def image_size(path: str, buf: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) from the header: a byte scan for JPEG/PNG, PIL's header parse
    otherwise; more than ``max_pixels`` (default: the policy's) is refused before DALI
    decodes anything (a small PNG can declare gigabytes)."""
    hw = _png_size(buf) or _jpeg_size(buf)
    if hw is None or hw[0] <= 0 or hw[1] <= 0:
        if not buf:
            raise formats.BadImage(path, "empty file")
        try:
            _, hw = formats.image_header(io.BytesIO(buf), max_pixels)
        except formats.BadImage as e:
            raise formats.BadImage(path, e.reason) from None
    formats.check_pixels(path, hw[1], hw[0], max_pixels)
    return hw
