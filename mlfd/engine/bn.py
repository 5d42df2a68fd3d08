"""Precise BatchNorm: running statistics recomputed for the final weights.

BatchNorm's running statistics are an exponential average over the training steps, each
taken with the weights of its own step. After few steps (a small dataset at a large
batch) they describe weights long gone, and in eval mode a model can give every image the
same class while its batch statistics classify well. Recomputing them with forward passes
in train mode, without gradients, over a capped sample of the training images makes them
the statistics of the weights that are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

# A model that took fewer optimiser steps than this gets its statistics recomputed.
STEPS = 500
# At most this many training images go through the recomputation (precise-BN's usual
# sample is a few thousand; the statistics settle long before).
IMAGES = 2048


def bn_layers(model: torch.nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate(model: torch.nn.Module, batches: Iterable, forward: Callable[[object], int],
                max_images: int = IMAGES) -> int:
    """Reset every BatchNorm layer's running mean/var and recompute them as the plain
    average over ``batches`` (momentum None), each passed to ``forward`` (which returns how
    many images it fed) in train mode until ``max_images``; returns the images used (0:
    the model has no BatchNorm). The model's train/eval mode is restored."""
    layers = bn_layers(model)
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts alike
    model.train()
    seen = 0
    try:
        it = iter(batches)
        for batch in it:
            seen += int(forward(batch))
            if seen >= max_images:
                break
        if hasattr(it, "close"):
            it.close()
    finally:
        for m, mom, state in zip(layers, momenta, saved):
            m.momentum = mom
            if seen == 0:  # nothing went through: the old statistics beat reset ones
                m.load_state_dict(state)
        model.train(was_training)
    return seen
