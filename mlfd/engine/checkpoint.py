"""Checkpoints as safetensors + a JSON sidecar (architecture, classes, metrics, hashes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import CorruptArtifact, MlfdError
from ..storage.diskio import write_atomic, write_text


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(stem: Path, state_dict: dict, meta: dict) -> str:
    """Write ``stem.safetensors`` and ``stem.json`` atomically; returns the weights' sha256.
    A full disk is a FilesystemError naming the file, with no temporary file left."""
    from safetensors.torch import save_file

    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    # an interrupted write never leaves a half checkpoint
    write_atomic(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    sha = file_sha256(weights)
    write_text(stem.with_suffix(".json"), json.dumps(dict(meta, sha256=sha), indent=2,
                                                      default=str))
    return sha


def load_meta(stem: Path) -> dict:
    side = stem.with_suffix(".json")
    if not side.exists():
        raise MlfdError(f"checkpoint metadata {side} is missing")
    meta = load_meta_safe(stem)
    if meta is None:
        raise CorruptArtifact(f"checkpoint metadata {side} is unreadable (half-written?): "
                              "the next run of its stage redoes it")
    return meta


def load_meta_safe(stem: Path) -> dict | None:
    """The JSON sidecar, or None when it is missing or damaged."""
    try:
        meta = json.loads(stem.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def verify_checkpoint(stem: Path) -> str | None:
    """None when ``stem`` has weights whose sha256 matches its sidecar; else what is wrong."""
    weights, side = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    meta = load_meta_safe(stem)
    if meta is None:
        return f"{side} is missing or unreadable"
    if not weights.exists():
        return f"{weights} is missing"
    if meta.get("sha256") != file_sha256(weights):
        return f"{weights} does not match its recorded sha256 (truncated or modified)"
    return None


def load_state(stem: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = stem.with_suffix(".safetensors")
    if not weights.exists():
        raise MlfdError(f"checkpoint {weights} is missing")
    problem = verify_checkpoint(stem)
    if problem:
        raise CorruptArtifact(f"checkpoint {problem}: the next run of its stage redoes it")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise MlfdError(f"checkpoint {weights} is unreadable: {e}") from None


def load_into(module: torch.nn.Module, stem: Path, what: str) -> None:
    """Strict load with a one-line error when the weights belong to another architecture."""
    state = load_state(stem)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise MlfdError(
            f"checkpoint {stem.with_suffix('.safetensors')} does not fit the {what} "
            f"(another architecture or class count?): {first}"
        ) from None
