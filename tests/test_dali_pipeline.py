"""DALI backend (CPU): same pixels as the torch pipeline, order, sharding, corrupt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")  # environment guard: DALI is a Linux-only dependency

from mlfd.data.datasets import Split
from mlfd.data.pipelines import InputSpec, TorchPipeline, build_pipeline  # noqa: E402
from mlfd.data.pipelines.dali import DaliPipeline  # noqa: E402
from mlfd.data.sampling import eval_order, train_order  # noqa: E402
from mlfd.data.views import ViewConfig  # noqa: E402
from mlfd.errors import MlfdError  # noqa: E402

TOL = 1e-4  # float32 resampling noise; one grey level after normalising is ~8e-3
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _smooth_images(n, h, w, c, seed=0):
    """Structured content (gradients + noise) so resampling errors would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy[None, :, :, None] * 7 + xx[None, :, :, None] * 3) % 256
    noise = rng.integers(0, 96, (n, h, w, c))
    return ((base + noise) % 256).astype(np.uint8)


def _collect(p):
    xs, labels, idx, views, sizes = [], [], [], [], []
    for b in p:
        xs.append(b.images)
        labels.append(b.labels)
        idx.append(b.index)
        views.append(b.view)
        sizes.append(len(b))
    return (torch.cat(xs), torch.cat(labels), torch.cat(idx), torch.cat(views), sizes)


def _both(split, spec, order, batch_size=5, seed=3):
    kw = dict(seed=seed, view_cfg=ViewConfig(), device="cpu")
    d = _collect(DaliPipeline(split, spec, order, batch_size, **kw))
    t = _collect(TorchPipeline(split, spec, order, batch_size, num_workers=0, **kw))
    return d, t


def _assert_same(d, t, tol=TOL):
    assert d[0].shape == t[0].shape and d[0].dtype == torch.float32
    diff = (d[0] - t[0]).abs().max().item()
    assert diff < tol, diff
    for a, b in zip(d[1:4], t[1:4], strict=True):
        assert torch.equal(a, b)
    assert d[4] == t[4]
    return diff


def _mixed_order(n, views=(0, 1, 2, 5)):
    return np.array([(i, views[i % len(views)]) for i in range(n)], dtype=np.int64)


@pytest.mark.parametrize("size,spec_kw", [
    ((32, 32), {}),
    ((64, 64), {}),
    ((32, 32), IMAGENET),  # RGB stats applied after replicating grayscale
    ((20, 24), {"channels_last": True}),  # downscale, non-square
])
def test_grayscale_arrays_match_torch(size, spec_kw):
    images = _smooth_images(13, 28, 28, 1)
    split = Split(labels=np.arange(13) % 4, images=images)
    spec = InputSpec(size=size, channels=3, **spec_kw)
    order = _mixed_order(13)
    d, t = _both(split, spec, order)
    _assert_same(d, t)
    assert d[0].shape == (13, 3, *size)
    if spec.channels_last:
        assert d[0].is_contiguous(memory_format=torch.channels_last)


def test_rgb_arrays_match_torch_with_flips():
    images = _smooth_images(16, 40, 30, 3, seed=1)
    split = Split(labels=np.arange(16), images=images)
    order = _mixed_order(16, views=(0, 1, 2, 3, 4, 7, 8, 9))
    d, t = _both(split, InputSpec(size=(32, 32), channels=3, **IMAGENET), order)
    _assert_same(d, t)
    # the order must exercise both a crop and a mirrored crop for the check to mean anything
    from mlfd.data.views import view_params
    p = view_params(3, order[:, 0], order[:, 1], 40, 30, ViewConfig())
    assert p.flip.any() and (~p.flip & (order[:, 1] > 0)).any()


def test_rgb_arrays_to_grayscale_model():
    images = _smooth_images(7, 24, 24, 3, seed=2)
    split = Split(labels=np.zeros(7), images=images)
    d, t = _both(split, InputSpec(size=(16, 16), channels=1, **IMAGENET), _mixed_order(7), 3)
    _assert_same(d, t)
    assert d[0].shape == (7, 1, 16, 16)


def _write_images(root, n, seed=0, ext="png"):
    """An ImageFolder-like tree of varied sizes; every third image is grayscale."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files, labels = [], []
    for i in range(n):
        h, w = int(rng.integers(20, 50)), int(rng.integers(20, 50))
        gray = i % 3 == 0
        arr = _smooth_images(1, h, w, 1 if gray else 3, seed=i)[0]
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"img{i:03d}.{ext}"
        # JPEG: 4:2:0 chroma, where DALI's fancy upsampling must match PIL's
        opts = {"quality": 90, "subsampling": 2} if ext == "jpg" else {}
        Image.fromarray(arr[:, :, 0] if gray else arr).save(path, **opts)
        files.append(str(path))
        labels.append(i % 2)
    return Split(labels=np.array(labels), files=files)


def test_png_files_match_torch(tmp_path):
    split = _write_images(tmp_path, 11)
    from PIL import Image

    assert {Image.open(f).mode for f in split.files} == {"L", "RGB"}  # both kinds present
    d, t = _both(split, InputSpec(size=(32, 32), channels=3, **IMAGENET), _mixed_order(11), 4)
    _assert_same(d, t)
    d, t = _both(split, InputSpec(size=(24, 24), channels=1), _mixed_order(11), 4)
    _assert_same(d, t)


def test_jpeg_files_match_torch(tmp_path):
    # both decode with libjpeg-turbo semantics (DALI CPU via nvImageCodec, PIL), so pixels agree
    split = _write_images(tmp_path, 7, ext="jpg")
    d, t = _both(split, InputSpec(size=(32, 32), channels=3, **IMAGENET), _mixed_order(7), 3)
    _assert_same(d, t)


def test_view_replays_across_instances():
    images = _smooth_images(9, 28, 28, 1)
    split = Split(labels=np.arange(9), images=images)
    spec = InputSpec(size=(32, 32), channels=3)
    order = train_order(9, epoch=2, seed=7, views="fresh")
    a = _collect(DaliPipeline(split, spec, order, 4, seed=7))[0]
    p = DaliPipeline(split, spec, order, 4, seed=7)
    b = _collect(p)[0]
    assert torch.equal(a, b)
    # a second pass over the same instance (after reset) replays too
    assert torch.equal(_collect(p)[0], a)
    # another seed gives other views
    c = _collect(DaliPipeline(split, spec, order, 4, seed=8))[0]
    assert (c - a).abs().max() > 0.1


def test_abandoned_pass_then_full_pass():
    images = _smooth_images(10, 28, 28, 1)
    split = Split(labels=np.arange(10), images=images)
    p = DaliPipeline(split, InputSpec(size=(32, 32)), eval_order(10), 3)
    first = next(iter(p))
    assert first.index.tolist() == [0, 1, 2]
    assert _collect(p)[2].tolist() == list(range(10))


def test_eval_order_every_sample_once_partial_last_batch():
    images = _smooth_images(23, 28, 28, 1)
    split = Split(labels=(np.arange(23) * 7) % 10, images=images)
    p = DaliPipeline(split, InputSpec(size=(32, 32)), eval_order(23), 8)
    assert len(p) == 3
    x, labels, idx, view, sizes = _collect(p)
    assert sizes == [8, 8, 7]
    assert idx.tolist() == list(range(23))
    assert view.tolist() == [0] * 23
    assert labels.tolist() == ((np.arange(23) * 7) % 10).tolist()
    assert labels.dtype == torch.int64 and idx.dtype == torch.int64
    # no duplicated padding: each sample's pixels appear once, matching its own image
    t = _collect(TorchPipeline(split, InputSpec(size=(32, 32)), eval_order(23), 8,
                               num_workers=0))
    assert (x - t[0]).abs().max() < TOL


def test_sharding_disjoint_and_complete():
    n, world = 17, 3
    images = _smooth_images(n, 28, 28, 1)
    split = Split(labels=np.arange(n), images=images)
    seen = []
    for rank in range(world):
        order = eval_order(n, views=2, rank=rank, world=world)
        _, _, idx, view, _ = _collect(DaliPipeline(split, InputSpec(size=(32, 32)), order, 4))
        assert view.tolist() == order[:, 1].tolist()
        seen.append(set(idx.tolist()))
    assert sum(len(s) for s in seen) == n
    assert set().union(*seen) == set(range(n))


def test_corrupt_header_names_file(tmp_path):
    split = _write_images(tmp_path, 6)
    bad = tmp_path / "class0" / "broken.jpg"
    bad.write_bytes(b"this is not an image at all")
    split.files[4] = str(bad)
    with pytest.raises(MlfdError, match="broken.jpg"):
        _collect(DaliPipeline(split, InputSpec(size=(32, 32)), eval_order(6), 2))


def test_truncated_file_names_file(tmp_path):
    split = _write_images(tmp_path, 6)
    good = Path(split.files[3]).read_bytes()
    bad = tmp_path / "class1" / "truncated.png"
    bad.write_bytes(good[: len(good) // 2])  # header intact, pixel data cut
    split.files[3] = str(bad)
    with pytest.raises(MlfdError, match="truncated.png"):
        _collect(DaliPipeline(split, InputSpec(size=(32, 32)), eval_order(6), 2))


def test_missing_file_names_file(tmp_path):
    split = _write_images(tmp_path, 3)
    split.files[1] = str(tmp_path / "nope.png")
    with pytest.raises(MlfdError, match="nope.png"):
        _collect(DaliPipeline(split, InputSpec(size=(32, 32)), eval_order(3), 2))


def test_build_pipeline_backends():
    split = Split(labels=np.arange(4), images=_smooth_images(4, 28, 28, 1))
    spec = InputSpec(size=(32, 32))
    auto = build_pipeline(split, spec, eval_order(4), 2, backend="auto")
    assert isinstance(auto, DaliPipeline) and len(auto) == 2
    assert isinstance(build_pipeline(split, spec, eval_order(4), 2, backend="dali"), DaliPipeline)
    assert isinstance(build_pipeline(split, spec, eval_order(4), 2, backend="torch"),
                      TorchPipeline)


def test_bad_inputs():
    split = Split(labels=np.arange(4), images=_smooth_images(4, 28, 28, 2))
    with pytest.raises(MlfdError, match="2-channel"):
        DaliPipeline(split, InputSpec(size=(32, 32)), eval_order(4), 2)
    with pytest.raises(MlfdError, match="batch size"):
        DaliPipeline(split, InputSpec(size=(32, 32), channels=2), eval_order(4), 0)
    empty = DaliPipeline(Split(labels=np.arange(4), images=_smooth_images(4, 8, 8, 1)),
                         InputSpec(size=(8, 8)), np.zeros((0, 2), np.int64), 2)
    assert len(empty) == 0 and list(empty) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    split = Split(labels=np.arange(4), images=_smooth_images(4, 28, 28, 1))
    with pytest.raises(MlfdError, match="no CUDA device"):
        DaliPipeline(split, InputSpec(size=(32, 32)), eval_order(4), 2, device="cuda")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_vs_torch_cpu(split, spec, order, batch_size=4):
    kw = dict(seed=3, view_cfg=ViewConfig())
    d = _collect(DaliPipeline(split, spec, order, batch_size, device="cuda", **kw))
    assert d[0].device.type == "cuda" and d[1].device.type == "cuda"
    assert d[2].device.type == "cpu" and d[3].device.type == "cpu"
    d = tuple(v.cpu() if torch.is_tensor(v) else v for v in d)
    t = _collect(TorchPipeline(split, spec, order, batch_size, num_workers=0, device="cpu", **kw))
    return d, t


@needs_cuda
def test_gpu_arrays_match_torch():
    split = Split(labels=np.arange(13), images=_smooth_images(13, 28, 28, 1))
    d, t = _gpu_vs_torch_cpu(split, InputSpec(size=(32, 32), **IMAGENET), _mixed_order(13))
    _assert_same(d, t)


@needs_cuda
def test_gpu_files_match_torch(tmp_path):
    png = _write_images(tmp_path / "png", 9)
    d, t = _gpu_vs_torch_cpu(png, InputSpec(size=(32, 32), **IMAGENET), _mixed_order(9))
    _assert_same(d, t)
    # nvJPEG's IDCT/upsampling may differ from libjpeg-turbo by a few grey levels
    jpg = _write_images(tmp_path / "jpg", 9, ext="jpg")
    d, t = _gpu_vs_torch_cpu(jpg, InputSpec(size=(32, 32), **IMAGENET), _mixed_order(9))
    _assert_same(d, t, tol=0.15)
    assert (d[0] - t[0]).abs().mean() < 0.02
