"""Compact targets: symmetric int8 quantisation and top-K logits.

int8: an array ``X`` of logical dtype ``int8`` is stored as int8 values ``q`` beside a
float32 array ``X_scale`` in the same group (plain zarr reads both); its values are
``q * scale``. One scale per (row, view) for logits and vectors, per (row, view, group of
channels) for maps (N, V, C, H, W), a group being the fewest whole channels that hold 48
values (``channel_group``): a channel of a 7x7 map, 16 channels of a 2x2 one. Channels
differ in range, so per-channel scales cut the error, but a float32 scale per channel of
a 2x2 map costs as much as its four int8 values (bench/compact.py measures error and
size per group). ``scale = max|x| / 127`` over the group, ``q = rint(x / scale)``:
|error| <= scale/2, zero groups stay exactly zero. Dequantised in float32 (``q`` and a
float32 scale multiply exactly in float64, so float32 rounds once: every reader gets the
same bits).

top-K: a logits row keeps its K largest values and their class indices, plus its minimum,
which stands for every other class when the row is expanded back (``topk_unpack``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import MlfdError

if TYPE_CHECKING:
    import torch

QUANTISED = "int8"  # the logical dtype that quantises
SCALE_SUFFIX = "_scale"
TOPK_INDEX = "logits_index"  # beside "logits" (K values + the row minimum) when top-K


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


# A map's scale covers whole channels and at least this many values: a float32 scale then
# adds at most 4/48 of the int8 bytes (per channel on 7x7 maps; 16 channels on 2x2 maps,
# where one scale per channel would cost as much as the values)
GROUP_VALUES = 48


def channel_group(shape, values: int = GROUP_VALUES) -> int:
    """Channels per scale of a map (N, V, C, H, W): the fewest that hold ``values``
    values and divide C (1 for vectors and logits: their scale covers the whole row)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) < 4:
        return 1
    c, hw = shape[2], int(np.prod(shape[3:], dtype=np.int64))
    g = max(1, min(c, -(-values // max(hw, 1))))
    while c % g:
        g += 1
    return g


def scale_shape(shape, group: int | None = None) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if len(shape) < 4:
        return (*shape[:-1], 1)
    return (*shape[:2], shape[2] // (group or channel_group(shape)))


def quantise(values, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales of ``scale_shape``) of float rows (numpy or torch).
    ``group``: channels per scale of a map (default ``channel_group``)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().float().numpy()
    x = np.asarray(values, dtype=np.float64)  # float64: x / scale rounds exactly to nearest
    sshape = scale_shape(x.shape, group)
    if x.size == 0:
        return x.astype(np.int8), np.zeros(sshape, dtype=np.float32)
    # one scale per last axis of this view: (N, V, groups, values of a group) for maps
    grouped = x.reshape(*sshape, -1)
    amax = np.abs(grouped).max(axis=-1, keepdims=True)
    if not np.isfinite(amax).all():
        raise MlfdError("int8 cache: the values to store are not finite (NaN or inf)")
    scale = (amax / 127).astype(np.float32)
    s = scale.astype(np.float64)
    q = np.rint(np.divide(grouped, s, out=np.zeros_like(grouped), where=s > 0))
    q = np.clip(q, -127, 127).astype(np.int8)  # float32 rounding of scale: at most 127.0000x
    return q.reshape(x.shape), scale.reshape(sshape)


def dequantise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale``: ``scale`` (rows, ..., C or 1) broadcast over the rest of ``q``."""
    import torch

    s = scale.to(torch.float32)
    if q.dim() > s.dim():  # a map (..., C, H, W): scales (..., C / group), per channel group
        s = s.repeat_interleave(q.shape[s.dim() - 1] // max(s.shape[-1], 1), dim=-1)
        s = s.reshape(*s.shape, *([1] * (q.dim() - s.dim())))
    return q.to(torch.float32) * s


def dequantised(tensors: dict[str, torch.Tensor], dtypes: dict[str, str]) -> dict:
    """``tensors`` with every int8 array whose scales are among them dequantised, and the
    scales left out: what a reader of the values sees, whole or streamed."""
    return {k: dequantise(v, tensors[scale_name(k)])
            if dtypes.get(k) == QUANTISED and scale_name(k) in tensors else v
            for k, v in tensors.items()
            if not (is_scale(k) and dtypes.get(k.removesuffix(SCALE_SUFFIX)) == QUANTISED)}


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def topk_active(k: int, num_classes: int) -> bool:
    return 0 < k < num_classes


def topk_pack(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (..., K + 1): the K largest then the row minimum, class indices (..., K))."""
    import torch

    vals, idx = logits.topk(k, dim=-1)
    low = logits.amin(dim=-1, keepdim=True)
    return torch.cat([vals, low], dim=-1), idx


def topk_unpack(values: torch.Tensor, index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full logits (..., C) from ``topk_pack``'s: the kept ones, the row minimum elsewhere."""
    low = values[..., -1:]
    full = low.expand(*values.shape[:-1], num_classes).clone()
    return full.scatter_(-1, index.long(), values[..., :-1])
