"""How long each dataset-specific model trains: its budget in epochs, steps and images.

The multi-dataset baselines draw one batch of every dataset at each step, for as many
steps as the largest dataset needs; a small dataset is cycled, so a baseline shows it far
more images than an equal number of epochs of its own teacher would. The joint teacher
shows every image once per epoch. The "equal-images" rule gives each teacher and student
at least as many images of its own dataset as the larger of those two shows it, and a
floor on steps per epoch (its batch capped by the dataset's size), so that a 150-image
dataset is not trained for two optimiser steps per epoch. "fixed" keeps the sections'
epochs as written (the presets: their values are documented and must not move).

A section's ``images`` or ``steps``, when set, size it explicitly under either rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

RULES = ("fixed", "equal-images")
# The floor on optimiser steps per epoch under "equal-images": a batch is capped at
# ceil(n / MIN_STEPS) images (never below MIN_BATCH, where BatchNorm's batch statistics
# get noisy).
MIN_STEPS = 8
MIN_BATCH = 16


@dataclass
class Budget:
    epochs: int
    batch_size: int
    steps_per_epoch: int
    steps: int
    images: int
    why: str

    def line(self) -> str:
        return (f"{self.epochs} epochs x {self.steps_per_epoch} steps of {self.batch_size} = "
                f"{self.steps} steps, {self.images} images ({self.why})")


def rule_of(exp) -> str:
    """The experiment's rule; unset: "equal-images" for custom experiments, "fixed" for
    presets (their values were chosen by hand)."""
    return exp.budget or ("equal-images" if exp.preset == "custom" else "fixed")


def baseline_images(exp, sizes: dict[str, int]) -> int:
    """Images of *each* dataset a multi-dataset baseline shows: teach.epochs passes over the
    largest dataset, every step drawing a batch of each (smaller datasets are cycled). The
    padding of the last batch is left out, so the largest dataset keeps its epochs."""
    return exp.teach.epochs * max(sizes.values())


def resolve(exp, section: str, name: str, cfg, sizes: dict[str, int]):
    """``cfg`` (the dataset's ``section`` config) with the budget's epochs and batch size."""
    b = budget(exp, section, name, cfg, sizes)
    return dataclasses.replace(cfg, epochs=b.epochs, batch_size=b.batch_size)


def budget(exp, section: str, name: str, cfg, sizes: dict[str, int]) -> Budget:
    """The budget of dataset ``name``'s teacher (``section`` "teach") or student
    ("distill"), with ``cfg`` its section config (the dataset's own values applied)."""
    n = max(1, sizes[name])
    rule, batch, epochs, why = rule_of(exp), cfg.batch_size, cfg.epochs, f"{section}.epochs"
    if rule == "equal-images":
        if cfg.grad_accum == 1:  # a capped batch must still split into micro-batches
            batch = min(batch, max(MIN_BATCH, math.ceil(n / MIN_STEPS)))
        # never below what the section asks; at least what the baselines and the joint
        # teacher show of this dataset
        want = max(epochs * n, baseline_images(exp, sizes), exp.fuse.epochs * n)
        if want > epochs * n:
            epochs, why = math.ceil(want / n), "equal images"
    per_epoch = math.ceil(n / batch)
    if cfg.images:  # explicit sizes win over any rule
        epochs, why = max(1, math.ceil(cfg.images / n)), f"{section}.images"
    elif cfg.steps:
        epochs, why = max(1, math.ceil(cfg.steps / per_epoch)), f"{section}.steps"
    return Budget(epochs, batch, per_epoch, epochs * per_epoch, epochs * n, why)
