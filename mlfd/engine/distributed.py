"""Process-group facts for torchrun/DDP runs; a single process is rank 0 of a world of 1."""

from __future__ import annotations

import os


def world() -> int:
    """Processes in the run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (torchrun's RANK; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Only rank 0 writes checkpoints, metrics, caches' metadata and reports."""
    return rank() == 0
