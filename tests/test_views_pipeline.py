"""Replayable views, pass coverage and the torch pipeline's pixels against plain torch ops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlfd.data.datasets import Split
from mlfd.data.pipelines import InputSpec, TorchPipeline, build_pipeline
from mlfd.data.sampling import eval_order, shard_indices, train_order
from mlfd.data.views import ViewConfig, view_params


def _split(n=23, h=12, w=10, c=1, seed=0):
    rng = np.random.default_rng(seed)
    return Split(labels=rng.integers(0, 3, n).astype(np.int64),
                 images=rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), files=None)


def test_view_zero_is_the_clean_resize():
    sp = _split()
    spec = InputSpec(size=(24, 20), channels=1, mean=(0.0,), std=(1.0,))
    b = next(iter(TorchPipeline(sp, spec, eval_order(len(sp)), 64)))
    ref = F.interpolate(torch.from_numpy(sp.images).permute(0, 3, 1, 2).float() / 255,
                        size=(24, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(b.images, ref, atol=1e-5)


def test_crop_and_flip_match_a_manual_crop():
    # A crop box on integer pixels with the output at the crop's own size is an exact copy.
    sp = _split(n=1, h=9, w=9, c=3)
    spec = InputSpec(size=(4, 5), channels=3, mean=(0.0,), std=(1.0,))
    from mlfd.data.pipelines import render

    x = render(torch.from_numpy(sp.images), [2.0], [3.0], [4.0], [5.0], [True], spec)
    crop = torch.from_numpy(sp.images[0, 2:6, 3:8]).permute(2, 0, 1).float() / 255
    assert torch.allclose(x[0], crop.flip(-1), atol=1e-6)


def test_views_replay_and_differ():
    cfg = ViewConfig(scale=(0.5, 1.0))
    idx, view = np.arange(50), np.full(50, 3)
    a = view_params(7, idx, view, 28, 28, cfg)
    b = view_params(7, idx, view, 28, 28, cfg)
    c = view_params(8, idx, view, 28, 28, cfg)
    np.testing.assert_array_equal(a.x0, b.x0)
    np.testing.assert_array_equal(a.flip, b.flip)
    assert not np.allclose(a.x0, c.x0)
    area = a.h * a.w / (28 * 28)
    assert (area >= 0.5 - 1e-9).all() and (area <= 1 + 1e-9).all()
    assert (a.y0 >= 0).all() and (a.y0 + a.h <= 28 + 1e-9).all()
    assert 0 < a.flip.mean() < 1
    assert not view_params(7, idx, view, 28, 28, ViewConfig(hflip=False)).flip.any()
    z = view_params(7, idx, np.zeros(50), 28, 28, cfg)
    assert (z.x0 == 0).all() and (z.h == 28).all() and not z.flip.any()


def test_same_view_same_pixels_across_pipelines():
    sp = _split()
    spec = InputSpec(size=(16, 16), channels=3)
    order = np.array([[5, 2], [1, 7], [5, 2]])
    a = next(iter(TorchPipeline(sp, spec, order, 8, seed=3))).images
    b = next(iter(TorchPipeline(sp, spec, order[::-1].copy(), 8, seed=3))).images
    assert torch.equal(a[0], a[2]) and torch.equal(a[1], b[1])


def test_eval_covers_every_sample_once_with_partial_last_batch():
    sp = _split(n=23)
    p = TorchPipeline(sp, InputSpec(size=(8, 8)), eval_order(len(sp)), 10)
    batches = list(p)
    assert [len(b) for b in batches] == [10, 10, 3] and len(p) == 3
    seen = torch.cat([b.index for b in batches]).numpy()
    np.testing.assert_array_equal(seen, np.arange(23))
    labels = torch.cat([b.labels for b in batches]).numpy()
    np.testing.assert_array_equal(labels, sp.labels)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_complete(world):
    parts = [shard_indices(23, r, world) for r in range(world)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(23))
    tparts = [train_order(23, 4, 0, "fresh", r, world)[:, 0] for r in range(world)]
    np.testing.assert_array_equal(np.sort(np.concatenate(tparts)), np.arange(23))


def test_train_order_shuffles_per_epoch_and_picks_cached_views():
    a, b = train_order(100, 0, 1, 4), train_order(100, 1, 1, 4)
    assert not np.array_equal(a[:, 0], b[:, 0])
    np.testing.assert_array_equal(np.sort(a[:, 0]), np.arange(100))
    assert set(np.unique(a[:, 1])) <= {0, 1, 2, 3} and len(np.unique(a[:, 1])) == 4
    np.testing.assert_array_equal(train_order(100, 0, 1, 4), a)
    assert (train_order(10, 5, 1, "fresh")[:, 1] == 6).all()


def test_grayscale_becomes_rgb_with_replicated_stats():
    sp = _split(n=4)
    spec = InputSpec(size=(12, 10), channels=3, mean=(0.5,), std=(0.25,))
    x = next(iter(build_pipeline(sp, spec, eval_order(4), 4, backend="torch"))).images
    assert x.shape == (4, 3, 12, 10)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    expect = (torch.from_numpy(sp.images[..., 0]).float() / 255 - 0.5) / 0.25
    assert torch.allclose(x[:, 0], expect, atol=1e-5)
