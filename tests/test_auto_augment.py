"""Optional AutoAugment (ImageNet policy) in both pipeline backends.

Contract (mlfd/data/pipelines/base.py): only views > 0 are augmented, after the replayable
geometry and before channel matching and normalisation; view 0 keeps its exact pixels.
The augmentation replays per (seed, index, view); test_replayable_auto_augment.py checks
that in depth (orders, batch sizes, torch/DALI agreement per op).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlfd.data.datasets import Split
from mlfd.data.pipelines import InputSpec, TorchPipeline, build_pipeline
from mlfd.data.views import ViewConfig
from mlfd.errors import MlfdError

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# A change of ~6 grey levels (normalised by std <= 0.5): well above uint8 rounding noise.
CHANGED = 0.05


def _images(n, h, w, c, seed=0):
    """Gradients plus noise: uniform noise alone would make equalize an identity."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy[None, :, :, None] * 5 + xx[None, :, :, None] * 2 + 40 * np.arange(c)) % 200
    return (base + rng.integers(0, 40, (n, h, w, c))).astype(np.uint8)


def _order(n, views=(0, 1, 2, 3)):
    return np.array([(i, views[i % len(views)]) for i in range(n)], dtype=np.int64)


def _run(cls, split, spec, order, auto_augment=None, batch_size=5, seed=3, **kw):
    p = cls(split, spec, order, batch_size, seed=seed, view_cfg=ViewConfig(), device="cpu",
            num_workers=kw.pop("num_workers", 1), auto_augment=auto_augment, **kw)
    return _collect(p)


def _collect(p):
    batches = list(p)
    x = torch.cat([b.images for b in batches])
    view = torch.cat([b.view for b in batches])
    return x, view, [len(b) for b in batches], p


def _check_contract(plain, aug, order, spec):
    """View 0 bit-identical, some views > 0 really changed, same shapes/dtypes/metadata."""
    x0, v0, sizes0, _ = plain
    x1, v1, sizes1, _ = aug
    assert x1.shape == x0.shape and x1.dtype == x0.dtype == torch.float32
    assert sizes1 == sizes0 and torch.equal(v0, v1)
    assert torch.equal(v1, torch.from_numpy(order[:, 1]))
    clean = v1 == 0
    assert clean.any() and (~clean).any()
    assert torch.equal(x1[clean], x0[clean])  # bit-identical, not merely close
    diff = (x1[~clean] - x0[~clean]).flatten(1).abs().amax(1)
    assert (diff > CHANGED).sum().item() >= 2, diff  # identity-like draws exist: not "all"
    # augmented pixels stay 8-bit images: finite and inside the normalised [0, 1] range
    assert torch.isfinite(x1).all()
    c = x1.shape[1]
    mean = torch.tensor(spec.mean if len(spec.mean) == c else spec.mean[:1] * c).view(1, -1, 1, 1)
    std = torch.tensor(spec.std if len(spec.std) == c else spec.std[:1] * c).view(1, -1, 1, 1)
    assert (x1 >= (0 - mean) / std - 1e-4).all() and (x1 <= (1 - mean) / std + 1e-4).all()


# ---- torch backend ---------------------------------------------------------------------


def test_torch_rgb_arrays():
    split = Split(labels=np.arange(16), images=_images(16, 30, 26, 3))
    spec = InputSpec(size=(24, 24), channels=3, **IMAGENET)
    order = _order(16)
    plain = _run(TorchPipeline, split, spec, order)
    aug = _run(TorchPipeline, split, spec, order, "imagenet")
    _check_contract(plain, aug, order, spec)
    # decisions per (seed, index, view): the same pixels again, whatever the batching
    again = _run(TorchPipeline, split, spec, order, "imagenet", batch_size=3)
    assert torch.equal(again[0], aug[0])


def test_torch_leaves_global_rng_alone():
    # the decisions come from the counter-based RNG: torch's generator is never drawn from
    split = Split(labels=np.arange(4), images=_images(4, 20, 20, 3))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _run(TorchPipeline, split, InputSpec(size=(16, 16)), _order(4), "imagenet")
    assert torch.equal(torch.rand(3), expected)


def test_torch_grayscale_source_and_files(tmp_path):
    from PIL import Image

    images = _images(12, 28, 28, 1, seed=1)
    split = Split(labels=np.arange(12), images=images)
    order = _order(12)
    spec = InputSpec(size=(20, 20), channels=3)
    _check_contract(_run(TorchPipeline, split, spec, order),
                    _run(TorchPipeline, split, spec, order, "imagenet"), order, spec)
    # file-backed splits render per sample (DataLoader path): same contract
    files = []
    for i, im in enumerate(_images(12, 26, 30, 3, seed=2)):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(files[-1])
    fsplit = Split(labels=np.arange(12), files=files)
    kw = dict(num_workers=0)
    _check_contract(_run(TorchPipeline, fsplit, spec, order, **kw),
                    _run(TorchPipeline, fsplit, spec, order, "imagenet", **kw), order, spec)


@pytest.mark.parametrize("bad", ["cifar10", "image_net", "", "none", 1])
def test_invalid_policy_is_one_line_error(bad):
    split = Split(labels=np.arange(2), images=_images(2, 8, 8, 3))
    spec, order = InputSpec(size=(8, 8)), _order(2)
    with pytest.raises(MlfdError) as e:
        TorchPipeline(split, spec, order, 2, auto_augment=bad)
    assert "auto_augment" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MlfdError):
        build_pipeline(split, spec, order, 2, backend="torch", auto_augment=bad)


def test_build_pipeline_passes_policy_through():
    split = Split(labels=np.arange(2), images=_images(2, 8, 8, 3))
    p = build_pipeline(split, InputSpec(size=(8, 8)), _order(2), 2, backend="torch",
                       auto_augment="ImageNet")
    assert p.auto_augment == "imagenet"
    assert build_pipeline(split, InputSpec(size=(8, 8)), _order(2), 2,
                          backend="torch").auto_augment is None


# ---- DALI backend (CPU mode) -----------------------------------------------------------


@pytest.fixture(scope="module")
def dali():
    pytest.importorskip("nvidia.dali")  # environment guard: DALI is a Linux-only dependency
    from mlfd.data.pipelines.dali import DaliPipeline

    return DaliPipeline


def test_dali_rgb_arrays(dali):
    split = Split(labels=np.arange(16), images=_images(16, 30, 26, 3))
    spec = InputSpec(size=(24, 24), channels=3, **IMAGENET)
    order = _order(16)
    plain = _run(dali, split, spec, order)
    aug = _run(dali, split, spec, order, "imagenet")
    assert aug[3].auto_augment == "imagenet" and aug[3]._pipe is not None  # the CPU graph ran
    _check_contract(plain, aug, order, spec)
    # a second pass over the same instance (pipeline reset) replays the same pixels, and so
    # does another instance with another batch size
    assert torch.equal(_collect(aug[3])[0], aug[0])
    assert torch.equal(_run(dali, split, spec, order, "imagenet", batch_size=3)[0], aug[0])


def test_dali_grayscale_arrays(dali):
    # augmented as one channel, as the torch backend does
    split = Split(labels=np.arange(12), images=_images(12, 28, 28, 1, seed=1))
    spec = InputSpec(size=(20, 20), channels=1)
    order = _order(12, views=(0, 4, 5))
    _check_contract(_run(dali, split, spec, order), _run(dali, split, spec, order, "imagenet"),
                    order, spec)


def test_dali_files_and_build_pipeline(dali, tmp_path):
    from PIL import Image

    files = []
    for i, im in enumerate(_images(10, 26, 30, 3, seed=2)):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im[:, :, 0] if i % 3 == 0 else im).save(files[-1])
    split = Split(labels=np.arange(10), files=files)
    spec = InputSpec(size=(20, 20), channels=3, **IMAGENET)
    order = _order(10)
    p = build_pipeline(split, spec, order, 4, backend="dali", seed=3, auto_augment="imagenet",
                       num_workers=1)
    assert isinstance(p, dali) and p.auto_augment == "imagenet"
    _check_contract(_run(dali, split, spec, order, batch_size=4), _collect(p), order, spec)


def test_dali_invalid_policy(dali):
    split = Split(labels=np.arange(2), images=_images(2, 8, 8, 3))
    with pytest.raises(MlfdError, match="auto_augment"):
        dali(split, InputSpec(size=(8, 8)), _order(2), 2, auto_augment="reduced_image_net")
    with pytest.raises(MlfdError, match="auto_augment"):
        build_pipeline(split, InputSpec(size=(8, 8)), _order(2), 2, backend="dali",
                       auto_augment="svhn")
