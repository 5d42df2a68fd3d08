"""NVIDIA DALI backend: the same (index, view) pairs and pixels as ``TorchPipeline``.

``mlfd.data.pipelines.dali_available()`` imports this module and registers
``PIPELINES["dali"]``; it raises ImportError when ``nvidia.dali`` cannot be imported,
which is how ``dali_available()`` decides.

Graph (one DALI pipeline per instance, rebuilt only when an epoch is abandoned):

* Inputs come from Python through ``fn.external_source`` in batch mode, pulled by
  iteration number, so the pipeline follows ``order`` exactly (``readers.file`` would
  draw its own order). Arrays: the uint8 HWC samples of the batch (on CUDA straight
  from a device-resident copy of the split when it fits in a quarter of free memory).
  Files: each file's encoded bytes, decoded by ``fn.decoders.image`` (``"mixed"`` on
  CUDA, ``"cpu"`` otherwise) to RGB with ``adjust_orientation=False`` (PIL does not
  apply EXIF rotation either) and ``jpeg_fancy_upsampling=True`` (libjpeg's chroma
  upsampling, as PIL uses). A grayscale file decoded to RGB is the replication that
  ``match_channels`` does.
* Geometry is computed in Python by ``views.view_params`` (the single definition of a
  view); file sizes come from the image headers. The crop box feeds ``fn.resize`` as
  absolute ``roi_start``/``roi_end`` argument inputs with ``antialias=False`` and
  linear interpolation: DALI then samples source coordinate
  ``roi_start + (i + 0.5) * roi_extent / out - 0.5`` with edge clamping, which is
  exactly ``grid_sample(bilinear, border, align_corners=False)`` in ``render``.
  A flip is a reversed x-range of the ROI (DALI flips when start > end), which maps
  output pixel i to the source coordinate of pixel ``W_out - 1 - i``, as the torch
  flip does. ``dtype=FLOAT`` keeps the resampled values unrounded.
* Channel matching (after resampling, where it commutes): ``fn.coord_transform``
  multiplies the channel vector by a matrix (ones for grayscale to C channels, the
  ITU-R 601 luma row for RGB to grayscale).
* ``fn.crop_mirror_normalize`` normalises with the same per-channel statistics as
  ``render`` (scaled by 255 since pixels stay in 0..255) and lays out CHW, or HWC when
  the spec wants channels-last, whose NCHW permutation is channels-last memory.

* ``auto_augment="imagenet"``: the steps drawn on the host (auto_augment.plan) run as
  DALI conditionals, each op rebuilt from DALI operators (see dali_augment.py).

A pass yields ``ceil(M / batch_size)`` batches: the external source simply supplies
fewer samples on the last iteration. CPU pipelines use ``device_id=None``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import numpy as np
import torch

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.pipeline import Pipeline
except Exception as e:  # a broken install must look like a missing one to the seam
    raise ImportError(f"nvidia-dali is not importable: {e.__class__.__name__}: {e}") from e

from ...errors import MlfdError
from .. import auto_augment as aa
from .. import formats
from ..views import view_params
from .base import (
    Batch,
    InputSpec,
    PipelineBase,
    _resident,
    _stats,
    check_auto_augment_channels,
    image_size,
)
from .dali_augment import _AutoAugmentOps, _round_half_even, _step_inputs

_PREFETCH = 2
_LUMA = (0.299, 0.587, 0.114)


def _channel_matrix(cin: int, cout: int) -> list[float] | None:
    """Row-major (cout x cin) matrix for coord_transform, or None when no mapping is needed."""
    if cin == cout:
        return None
    if cin == 1:
        return [1.0] * cout
    if cin == 3 and cout == 1:
        return list(_LUMA)
    raise MlfdError(f"cannot map {cin}-channel images to a {cout}-channel model")


def _find_undecodable(paths, max_pixels: int | None = None) -> tuple[str, str] | None:
    """The first file that does not decode, with the reason (used after a DALI failure)."""
    for path in paths:
        try:
            formats.read_image(path, max_pixels)
        except formats.BadImage as e:
            return path, e.reason or str(e)
    return None


def _dali_reason(err: Exception) -> str:
    """The informative line of a DALI pipeline error (it leads with generic boilerplate)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("encountered:") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else err.__class__.__name__


def _gpu_resident_fits(images: np.ndarray, device: torch.device) -> bool:
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return False
    return images.nbytes <= free // 4


class DaliPipeline(PipelineBase):
    """DALI backend: external-source inputs, DALI decode/resample/normalise, torch output."""

    name = "dali"

    def __init__(self, split, spec: InputSpec, order: np.ndarray, batch_size: int, **kw):
        super().__init__(split, spec, order, batch_size, **kw)
        self.gpu = self.device.type == "cuda"
        if self.gpu:
            # DALI fails obscurely without a driver; say so plainly instead.
            if not torch.cuda.is_available():
                raise MlfdError("the DALI pipeline was asked for CUDA but no CUDA device is available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type != "cpu":
            raise MlfdError(f"the DALI pipeline runs on cpu or cuda, not {self.device.type}")
        self.num_threads = self.num_workers
        self.max_pixels = formats.max_image_pixels()
        if split.images is not None:
            self.images = np.asarray(split.images)
            if self.images.ndim != 4 or self.images.dtype != np.uint8:
                raise MlfdError(f"in-memory images must be uint8 (N, H, W, C), got "
                                f"{self.images.dtype} {self.images.shape}")
            self.files = None
            cin = self.images.shape[3]
        elif split.files is not None:
            self.images, self.files = None, list(split.files)
            cin = 3  # files are decoded to RGB (grayscale replicated, as match_channels does)
        else:
            raise MlfdError("the split has neither in-memory images nor image files")
        self._matrix = _channel_matrix(cin, spec.channels)
        self._cin = cin
        if self.auto_augment is not None:
            check_auto_augment_channels(cin)
            self._aa_ops = _AutoAugmentOps(cin, tuple(spec.size), self.gpu)
            self._aa_kinds = self._aa_ops.kinds(self.auto_augment)
        self._resident = None
        if self.images is not None and self.gpu and _gpu_resident_fits(self.images, self.device):
            self._resident = _resident(self.images, self.device)
        self._pipe = None
        self._pending: dict[int, list] = {}

    # ---- inputs, pulled by DALI per iteration -------------------------------------------

    def _pairs(self, k: int) -> np.ndarray:
        if k >= len(self):
            raise StopIteration
        return self.order[k * self.batch_size:(k + 1) * self.batch_size]

    def _inputs(self, k: int, part: int):
        """Part 0: the batch's images (or encoded files); part 1: its (roi_start, roi_end)
        and, with auto_augment, its per-sample ``view > 0`` flags and step inputs."""
        entry = self._pending.get(k)
        if entry is None:
            entry = self._pending[k] = [*self._make_inputs(k), 2]
        out = entry[part]
        entry[2] -= 1
        if entry[2] == 0:  # both external sources have taken their share
            del self._pending[k]
        return out

    def _make_inputs(self, k: int):
        pairs = self._pairs(k)
        idx, view = pairs[:, 0], pairs[:, 1]
        if self.files is not None:
            data, hw = [], []
            for i in idx:
                path = self.files[i]
                try:
                    with open(path, "rb") as fh:
                        buf = fh.read()
                except OSError as e:
                    raise MlfdError(f"cannot read image {path}: {e.strerror or e}") from None
                hw.append(image_size(path, buf, self.max_pixels))
                data.append(np.frombuffer(buf, dtype=np.uint8))
            H, W = np.array(hw, dtype=np.int64).T
        else:
            H, W = self.images.shape[1:3]
            if self._resident is not None:
                sel = torch.from_numpy(idx).to(self.device)
                data = self._resident.index_select(0, sel)
            else:
                data = np.ascontiguousarray(self.images[idx])
        p = view_params(self.seed, idx, view, H, W, self.view_cfg)
        x_start = np.where(p.flip, p.x0 + p.w, p.x0)  # reversed x-range = horizontal flip
        x_end = np.where(p.flip, p.x0, p.x0 + p.w)
        start = np.stack([p.y0, x_start], 1).astype(np.float32)
        end = np.stack([p.y0 + p.h, x_end], 1).astype(np.float32)
        if self.auto_augment is not None:
            steps = aa.plan(self.auto_augment, self.seed, idx, view, *self.spec.size)
            return data, (start, end, steps.active,
                          *_step_inputs(steps, self._aa_kinds, tuple(self.spec.size)))
        return data, (start, end)

    def _source(self, part: int):
        """A pull callback for one external source; a weak reference avoids a cycle through
        the DALI pipeline, so a dropped DaliPipeline frees its threads and buffers promptly."""
        ref = weakref.ref(self)

        def source(k):
            me = ref()
            if me is None:
                raise StopIteration
            return me._inputs(k, part)

        return source

    # ---- graph ---------------------------------------------------------------------------

    def _build(self) -> Pipeline:
        kw = dict(batch_size=self.batch_size, num_threads=self.num_threads,
                  device_id=self.device.index if self.gpu else None,
                  prefetch_queue_depth=_PREFETCH, seed=self.seed & 0x7FFFFFFF)
        if self.auto_augment is None:
            pipe = Pipeline(**kw)
            with pipe:
                pipe.set_outputs(self._graph())
        else:
            ref = weakref.ref(self)  # as in _source: the pipeline must not keep self alive

            def graph():
                return ref()._graph()

            # the steps branch per sample with `if` on DataNodes: conditional mode only
            pipe = pipeline_def(graph, enable_conditionals=True)(**kw)
        pipe.build()
        return pipe

    def _graph(self):
        spec = self.spec
        if self.auto_augment is not None:
            start, end, aug, code, a, b, m = fn.external_source(
                source=self._source(1), num_outputs=7, batch=True,
                dtype=[types.FLOAT, types.FLOAT, types.BOOL, types.INT32, types.FLOAT,
                       types.FLOAT, types.FLOAT], ndim=[1, 1, 0, 1, 1, 1, 3])
        else:
            start, end = fn.external_source(
                source=self._source(1), num_outputs=2, batch=True,
                dtype=[types.FLOAT, types.FLOAT], ndim=[1, 1])
        if self.files is not None:
            enc = fn.external_source(source=self._source(0), batch=True,
                                     dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(enc, device="mixed" if self.gpu else "cpu",
                                    output_type=types.RGB, adjust_orientation=False,
                                    jpeg_fancy_upsampling=True)
        else:
            img = fn.external_source(
                source=self._source(0), batch=True,
                device="gpu" if self._resident is not None else "cpu",
                dtype=types.UINT8, ndim=3, layout="HWC")
            if self.gpu and self._resident is None:
                img = img.gpu()
        x = fn.resize(img, size=[float(s) for s in spec.size], roi_start=start, roi_end=end,
                      roi_relative=False, antialias=False, interp_type=types.INTERP_LINEAR,
                      dtype=types.FLOAT)
        if self.auto_augment is not None:
            x = self._auto_augment(x, aug, code, a, b, m)
        if self._matrix is not None:
            x = fn.coord_transform(x, M=self._matrix, dtype=types.FLOAT)
        mean, std = _stats(spec, spec.channels, "cpu")
        x = fn.crop_mirror_normalize(
            x, mean=[255.0 * v for v in mean.flatten().tolist()],
            std=[255.0 * v for v in std.flatten().tolist()],
            output_layout="HWC" if spec.channels_last else "CHW", dtype=types.FLOAT)
        return x

    def _auto_augment(self, x, aug, code, a, b, m):
        """AutoAugment the flagged samples of the resampled float HWC batch (0..255)."""
        if aug:
            u8 = fn.cast(_round_half_even(x), dtype=types.UINT8)
            if self.gpu:  # arithmetic on GPU samples takes GPU scalars
                a, b = a.gpu(), b.gpu()
            for j in range(2):
                u8 = self._step(u8, code[j], a[j], b[j], m[j])
            x = fn.cast(u8, dtype=types.FLOAT)
        return x

    def _step(self, x, code, a, b, m):
        """One step: the branch whose code the sample carries (none for code -1)."""
        for k, kind in enumerate(self._aa_kinds):
            if code == k:
                x = getattr(self._aa_ops, kind)(x, a, b, m)
        return x

    # ---- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        if len(self.order) == 0:
            return
        if self._pipe is None:
            self._pipe = self._build()
        pipe, done = self._pipe, False
        self._pending.clear()
        try:
            for k in range(len(self)):
                yield self._batch(k, self._run(pipe, k))
            try:  # reach the end of data so that reset() starts the next pass at 0
                self._run(pipe, len(self))
                raise MlfdError("internal error: DALI produced more batches than planned")
            except StopIteration:
                pass
            pipe.reset()
            done = True
        finally:
            if not done:  # abandoned or failed mid-pass: prefetched state is stale
                self._pipe = None
                self._pending.clear()

    def _run(self, pipe: Pipeline, k: int):
        try:
            (out,) = pipe.run()
        except StopIteration:
            raise
        except MlfdError:
            raise
        except RuntimeError as e:
            raise self._explain(e, k) from None
        return out

    def _explain(self, err: RuntimeError, k: int) -> Exception:
        """Name the file behind a DALI failure (decode errors surface for a prefetched batch)."""
        if self.files is None:
            return err
        stop = min(len(self.order), (k + _PREFETCH + 1) * self.batch_size)
        batch_files = [self.files[i] for i in self.order[k * self.batch_size:stop, 0]]
        found = _find_undecodable(batch_files, self.max_pixels)
        reason = _dali_reason(err)
        if found is not None:
            path, why = found
            return MlfdError(f"cannot decode image {path}: {why} (DALI: {reason})")
        return MlfdError(f"DALI failed on the batch starting at {batch_files[0]}: {reason}")

    def _batch(self, k: int, out) -> Batch:
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out.as_tensor()
            x = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            x = torch.from_numpy(out.as_array())
        if self.spec.channels_last:  # DALI wrote NHWC: the NCHW view is channels-last memory
            x = x.permute(0, 3, 1, 2)
        pairs = self.order[k * self.batch_size:(k + 1) * self.batch_size]
        idx = pairs[:, 0]
        return Batch(x, self.labels[idx].to(self.device), torch.from_numpy(idx.copy()),
                     torch.from_numpy(pairs[:, 1].copy()))
