"""DALI AutoAugment: torchvision's uint8 arithmetic rebuilt from DALI operators.

``auto_augment="imagenet"`` (see pipelines/base.py for the contract, auto_augment.py for
the policy): the random decisions are made on the host by ``auto_augment.plan`` from
(seed, index, view) and fed per sample beside the crop boxes (a ``view > 0`` flag and,
for each of the two steps, a branch code, two scalars and a 2x3 matrix), so a view
replays whatever batch it lands in. The graph, traced with ``pipeline_def(
enable_conditionals=True)``, rounds flagged samples to uint8 and runs each step through
DALI conditionals, one branch per op the policy uses. Each branch redoes torchvision's
arithmetic on uint8 HWC (the torch backend is the reference): truncating blends, its
float32 grey weights, its fused multiply-adds (emulated in float64, where that product
is exact), round-half-even after resampling. Rotate, shear and translate are one
``fn.warp_affine`` with the host-computed inverse map; it warps a ones channel beside
the image and blends the fill with it, which is how torchvision fills under bilinear
sampling. Equalize calls torchvision's own kernel through
``fn.dl_tensor_python_function``: DALI has no histogram op to build PIL's lookup table
with, and ``fn.equalize`` (OpenCV's table) is off by 13 grey levels on average at 24 px
(0.7 at 224 px). A grayscale array is augmented with one channel; files are decoded to
RGB, so a grayscale file is augmented as three equal channels.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types
    from nvidia.dali.data_node import DataNode
except Exception as e:  # a broken install must look like a missing one to the seam
    raise ImportError(f"nvidia-dali is not importable: {e.__class__.__name__}: {e}") from e

from .. import auto_augment as aa

_SHARPEN = np.full((3, 3), 1.0 / 13.0, dtype=np.float32)  # torchvision's smoothing kernel
_SHARPEN[1, 1] = np.float32(5.0 / 13.0)
_GREY = tuple(float(np.float32(w)) for w in (0.2989, 0.587, 0.114))  # its float32 luma
# graph branch (an _AutoAugmentOps method) of each op: the geometric ops share one warp
_KIND = {op: "affine" if op in aa.GEOMETRIC else op.lower() for op in aa.OPS}


def _f64(v):
    if isinstance(v, DataNode):
        return fn.cast(v, dtype=types.FLOAT64)
    return types.Constant(float(v), dtype=types.FLOAT64)


def _fma(a, b, c):
    """``a * b + c`` rounded once to float32, as torch's vectorised ``add(alpha=)`` computes
    it; every product here has at most 48 significant bits, so float64 holds it exactly."""
    return fn.cast(_f64(a) * _f64(b) + _f64(c), dtype=types.FLOAT)


def _trunc_u8(v):
    """Clamp to [0, 255] and truncate, as torchvision's ``.to(torch.uint8)`` after a blend."""
    return fn.cast(dmath.floor(dmath.clamp(v, 0.0, 255.0)), dtype=types.UINT8)


def _round_half_even(v):
    """torch.round (ties to even); DALI's float-to-int cast rounds ties away from zero."""
    r = dmath.floor(v + 0.5)
    return r - (((r - v) == 0.5) & ((r - dmath.floor(r * 0.5) * 2.0) == 1.0))


def _equalize(images):
    """torchvision's equalize on a batch of uint8 HWC DLPack tensors (a DALI python op)."""
    from torchvision.transforms.v2 import functional as TF  # after mlfd's torchvision shim

    if len(images) == 0:
        return []
    x = torch.stack([torch.from_dlpack(t) for t in images])
    out = TF.equalize(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()
    if out.is_cuda:  # DALI reads the result on its own stream
        torch.cuda.current_stream(out.device).synchronize()
    return [torch.utils.dlpack.to_dlpack(t) for t in out]


class _AutoAugmentOps:
    """The steps on uint8 HWC samples, each matching torchvision's ``functional`` op.

    Every method takes the batch and the step's per-sample inputs: ``a`` and ``b``
    (float32 scalars, see :func:`_step_inputs`) and ``m`` (the 2x3 inverse map).
    """

    def __init__(self, channels: int, size: tuple[int, int], gpu: bool):
        self.c, self.size, self.device = channels, size, "gpu" if gpu else "cpu"

    def kinds(self, policy) -> list[str]:
        """One graph branch per distinct op of the policy (the geometric ops share one);
        Color on one channel is the identity (torchvision leaves grayscale alone)."""
        names = [step[0] for sub_policy in aa.policy_table(policy) for step in sub_policy]
        kinds = dict.fromkeys(_KIND[n] for n in names if not (n == "Color" and self.c == 1))
        return list(kinds)

    def _grey(self, xf):
        g = xf[:, :, 0:1] * _GREY[0]
        g = _fma(xf[:, :, 1:2], _GREY[1], g)
        return dmath.floor(_fma(xf[:, :, 2:3], _GREY[2], g))  # floored, as for uint8 input

    def affine(self, x, a, b, m):
        # torchvision samples image and a ones channel with zero padding, then blends
        # mask * (image - fill) + fill: DALI's own fill_value would weight the fill by the
        # out-of-bounds taps instead, a different edge.
        xf = fn.cast(x, dtype=types.FLOAT)
        y = fn.warp_affine(fn.cat(xf, xf[:, :, 0:1] * 0.0 + 1.0, axis_name="C"), matrix=m,
                           inverse_map=True, fill_value=0.0, interp_type=types.INTERP_LINEAR,
                           dtype=types.FLOAT)
        v, mask = y[:, :, 0:self.c], y[:, :, self.c:self.c + 1]
        return fn.cast(_round_half_even(mask * (v - float(aa.FILL)) + float(aa.FILL)),
                       dtype=types.UINT8)

    def brightness(self, x, a, b, m):
        return _trunc_u8(fn.cast(x, dtype=types.FLOAT) * a)

    def color(self, x, a, b, m):
        xf = fn.cast(x, dtype=types.FLOAT)
        return _trunc_u8(_fma(self._grey(xf), b, xf * a))

    def contrast(self, x, a, b, m):
        xf = fn.cast(x, dtype=types.FLOAT)
        mean = fn.reductions.mean(self._grey(xf) if self.c == 3 else xf, axis_names="HWC",
                                  keep_dims=True)
        return _trunc_u8(_fma(mean, b, xf * a))

    def sharpness(self, x, a, b, m):
        xf = fn.cast(x, dtype=types.FLOAT)
        kernel = types.Constant(_SHARPEN, device=self.device)
        # blurred values are multiples of 1/13, never near a tie: floor(v + 0.5) is torch.round
        blurred = dmath.floor(fn.filter(xf, kernel, border="clamp") + 0.5)
        inner = np.zeros((*self.size, 1), dtype=np.float32)
        inner[1:-1, 1:-1] = 1.0  # torchvision keeps the 1-pixel frame of the input
        inner = types.Constant(inner, device=self.device)
        mixed = _fma(blurred - xf, b, xf)
        return _trunc_u8(mixed * inner + xf * (1.0 - inner))

    def posterize(self, x, a, b, m):
        return x & fn.cast(a, dtype=types.UINT8)  # a holds the bit mask

    def solarize(self, x, a, b, m):
        return x ^ (fn.cast(x >= a, dtype=types.UINT8) * types.Constant(255, dtype=types.UINT8))

    def autocontrast(self, x, a, b, m):
        xf = fn.cast(x, dtype=types.FLOAT)
        lo = fn.reductions.min(xf, axis_names="HW", keep_dims=True)
        hi = fn.reductions.max(xf, axis_names="HW", keep_dims=True)
        flat = hi == lo  # a flat channel is left as it is
        inv_scale = (hi - lo) * float(np.float32(1.0 / 255.0)) + flat
        return _trunc_u8((xf - lo * (flat ^ True)) / inv_scale)

    def equalize(self, x, a, b, m):
        return fn.dl_tensor_python_function(x, function=_equalize, device=self.device,
                                            batch_processing=True, output_layouts="HWC")

    def invert(self, x, a, b, m):
        return x ^ types.Constant(255, dtype=types.UINT8)


def _step_inputs(steps: aa.Steps, kinds: list[str], size: tuple[int, int]):
    """Per-sample graph inputs of the two steps: branch code (-1: none), a, b, inverse map.

    ``a`` is the op's factor (enhance ops), bit mask (Posterize) or threshold (Solarize);
    ``b`` is ``1 - factor`` rounded from float64, as torchvision passes ``alpha``.
    """
    code_of = np.array([kinds.index(_KIND[op]) if _KIND[op] in kinds else -1 for op in aa.OPS]
                       + [-1], dtype=np.int32)  # index -1 (no step) reads the last entry
    code = code_of[steps.op]
    a = steps.param.astype(np.float32)
    bits = steps.param.astype(np.int64).clip(0, 8)
    a = np.where(steps.op == aa.OPS.index("Posterize"), (0xFF << (8 - bits)) & 0xFF, a)
    b = (1.0 - steps.param).astype(np.float32)
    m = np.stack([aa.inverse_affine(steps.op[:, j], steps.param[:, j], *size) for j in range(2)],
                 1)
    return code, a.astype(np.float32), b, m.astype(np.float32)
