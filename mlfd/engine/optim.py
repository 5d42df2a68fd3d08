"""Optimisers and per-step learning-rate schedules from a TrainConfig."""

from __future__ import annotations

import math

import torch

from ..errors import MlfdError


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    name = cfg.optimizer.lower()
    if cfg.lr <= 0:
        raise MlfdError(f"learning rate must be > 0, got {cfg.lr}")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adam":
        # Adam "with weight decay for regularization" (paper, T1): L2 added to the gradient.
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True,
                               weight_decay=cfg.weight_decay)
    raise MlfdError(f"unknown optimizer {cfg.optimizer!r}: choose adamw, adam or sgd")


def lr_factor(schedule: str, step: int, total: int, warmup: int, peak: float = 10.0) -> float:
    """Multiplier of the base lr at a step (0-based) out of ``total`` steps.

    With p the progress after warm-up (0 → 1):

    * ``onecycle``: 0.04 + 0.96 p/0.3 up to the peak 1 at p = 0.3, then a cosine to 1e-4.
    * ``onecycle-constant`` (paper 4.4: a one-cycle whose final lr equals the constant
      one): 1 + (peak - 1) p/0.3 up to ``peak`` at p = 0.3, then a cosine back to 1
      (the base lr) at p = 1, where it stays. Like OneCycleLR(max_lr=peak*lr,
      div_factor=peak, final_div_factor=1) with a linear ramp.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "onecycle":
        # Linear ramp to the peak over the first 30%, cosine anneal to 1/1e4 of it after.
        if progress < 0.3:
            return 0.04 + 0.96 * progress / 0.3
        p = (progress - 0.3) / 0.7
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    if schedule == "onecycle-constant":
        if progress < 0.3:
            return 1 + (peak - 1) * progress / 0.3
        p = (progress - 0.3) / 0.7
        return 1 + (peak - 1) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    raise MlfdError(f"unknown schedule {schedule!r}: "
                    "choose constant, onecycle, onecycle-constant or cosine")


def build_scheduler(opt, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    lr_factor(cfg.schedule, 0, total, warmup)  # validate the name up front
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(cfg.schedule, s, total, warmup, cfg.peak_factor))
