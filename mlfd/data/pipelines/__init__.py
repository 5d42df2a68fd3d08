"""The pipeline seam: :func:`build_pipeline` picks a backend by name.

``torch`` (torch_pipeline.py) is always there; ``dali`` (dali.py) where nvidia-dali
imports, registered by :func:`dali_available`. base.py holds the interface both
implement and what they share; neither backend imports the other.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ...errors import MlfdError
from ..views import ViewConfig
from .base import (
    Batch,
    InputSpec,
    PipelineBase,
    check_auto_augment,
    check_auto_augment_channels,
    match_channels,
    render,
)
from .torch_pipeline import TorchPipeline

__all__ = [
    "PIPELINES", "Batch", "InputSpec", "PipelineBase", "TorchPipeline", "build_pipeline",
    "check_auto_augment", "check_auto_augment_channels", "dali_available", "match_channels",
    "render", "resolve_pipeline",
]

PIPELINES = {"torch": TorchPipeline}


def dali_available() -> bool:
    """Whether nvidia-dali imports here; when it does, ``PIPELINES["dali"]`` is registered."""
    try:
        from .dali import DaliPipeline
    except Exception:
        return False
    PIPELINES.setdefault("dali", DaliPipeline)
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
