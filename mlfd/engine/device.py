"""Device selection shared by every stage."""

from __future__ import annotations

import torch

from ..errors import MlfdError


def select_device(name: str = "auto") -> torch.device:
    """The device to run on; under torchrun plain "cuda" is this process's GPU (LOCAL_RANK)."""
    from .distributed import local_rank, under_torchrun

    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MlfdError("--device cuda was asked for but no CUDA device is available")
        if name == "cuda" and under_torchrun():
            if local_rank() >= torch.cuda.device_count():
                raise MlfdError(f"process {local_rank()} of this machine has no CUDA device of "
                                f"its own ({torch.cuda.device_count()} here): start at most "
                                "that many processes per machine, or use --device cpu")
            return torch.device("cuda", local_rank())
        return torch.device(name)
    raise MlfdError(f"unknown device {name!r}: use auto, cpu or cuda")
