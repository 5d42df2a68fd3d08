"""Replayable views: crop and flip parameters from a counter-based RNG.

A view is identified by (seed, sample index, view id). Its parameters are a pure
function of those three integers, so the teacher-side cache and the student's
pipeline regenerate exactly the same pixels in any run, any stage and either
pipeline backend. View 0 is the clean eval view (whole image, no flip).

Geometry (shared by every backend): a crop box (y0, x0, h, w) in source pixels,
resampled bilinearly to the output size with half-pixel centres (output pixel i
samples source coordinate y0 + (i + 0.5) * h / H_out - 0.5, clamped to the
border), then mirrored horizontally when ``flip`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixed hash of uint64 counters."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, index: np.ndarray, view: np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1) from the counter (seed, index, view, stream)."""
    index = np.asarray(index, dtype=np.uint64)
    view = np.asarray(view, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(np.full(index.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF)))
        h = _mix64(h ^ index)
        h = _mix64(h ^ (view * np.uint64(0x2545F4914F6CDD1D)))
        h = _mix64(h ^ np.uint64(stream))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class ViewConfig:
    """Random-resized-crop + flip family from which views > 0 are drawn."""

    scale: tuple[float, float] = (0.6, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h
    hflip: bool = True

    def to_dict(self) -> dict:
        return {"scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip}


@dataclass
class ViewParams:
    """Per-sample crop boxes in source pixels (float) and flip flags."""

    y0: np.ndarray
    x0: np.ndarray
    h: np.ndarray
    w: np.ndarray
    flip: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.flip)


def view_params(
    seed: int,
    index: np.ndarray,
    view: np.ndarray,
    height: int | np.ndarray,
    width: int | np.ndarray,
    cfg: ViewConfig,
) -> ViewParams:
    """Crop/flip parameters of each (index, view); view 0 gives the whole image unflipped."""
    index = np.asarray(index, dtype=np.int64)
    view = np.asarray(view, dtype=np.int64)
    H = np.broadcast_to(np.asarray(height, dtype=np.float64), index.shape)
    W = np.broadcast_to(np.asarray(width, dtype=np.float64), index.shape)
    u = [counter_uniform(seed, index, view, s) for s in range(4)]
    area = H * W * (cfg.scale[0] + u[0] * (cfg.scale[1] - cfg.scale[0]))
    log_r = np.log(cfg.ratio[0]) + u[1] * (np.log(cfg.ratio[1]) - np.log(cfg.ratio[0]))
    r = np.exp(log_r)
    w = np.minimum(np.sqrt(area * r), W)
    h = np.minimum(np.sqrt(area / r), H)
    y0 = u[2] * (H - h)
    x0 = u[3] * (W - w)
    flip = (counter_uniform(seed, index, view, 4) < 0.5) & cfg.hflip
    clean = view == 0
    return ViewParams(
        y0=np.where(clean, 0.0, y0),
        x0=np.where(clean, 0.0, x0),
        h=np.where(clean, H, h),
        w=np.where(clean, W, w),
        flip=np.where(clean, False, flip),
    )
