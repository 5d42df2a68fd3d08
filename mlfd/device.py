"""Device selection shared by every stage."""

from __future__ import annotations

import torch

from .errors import MlfdError


def select_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MlfdError("--device cuda was asked for but no CUDA device is available")
        return torch.device(name)
    raise MlfdError(f"unknown device {name!r}: use auto, cpu or cuda")
