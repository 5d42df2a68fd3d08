"""Self-describing students: timm / Hugging Face style ``config.json`` beside plain weights.

    <OUT>/model.safetensors   the student's timm state dict (what `mlfd eval` measures)
    <OUT>/config.json         architecture, num_classes, num_features, label_names,
                              model_args, pretrained_cfg (input size, mean/std, ...)

The folder loads with plain timm, no mlfd needed:
``timm.create_model("local-dir:OUT", pretrained=True)``, or with the config's values
(``pretrained_cfg_overlay=dict(config["pretrained_cfg"], file="OUT/model.safetensors")``).
The same config.json is written next to every promoted student (students/D/LK/);
`mlfd export` (mlfd.stages.export) copies both out.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..storage.diskio import write_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _rgb(values) -> list[float]:
    """Three-channel statistics: mlfd feeds grayscale images to models as replicated RGB."""
    v = [float(x) for x in values]
    if len(v) == 3:
        return v
    if len(v) == 1:
        return v * 3
    return [sum(v) / len(v)] * 3


def timm_config(meta: dict, num_features: int) -> dict:
    """The timm/Hugging Face ``config.json`` of a checkpoint described by its mlfd sidecar."""
    import timm

    arch, size = meta["arch"], int(meta["input_size"])
    model_args = dict(meta.get("model_kwargs") or {})
    default = timm.get_pretrained_cfg(arch)
    # timm passes img_size=input_size to fixed-size models: only say so when that rebuilds
    # the model mlfd trained (img_size among its arguments, or the arch's own size).
    fixed = bool(default and default.fixed_input_size) and (
        "img_size" in model_args or tuple(default.input_size[1:]) == (size, size))
    pretrained_cfg = {
        "input_size": [3, size, size],
        "fixed_input_size": fixed,
        # mlfd resizes the whole image bilinearly to input_size: no crop
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": _rgb(meta["mean"]),
        "std": _rgb(meta["std"]),
        "num_classes": int(meta["num_classes"]),
    }
    for key in ("first_conv", "classifier"):  # what timm adapts when channels/classes change
        if default is not None and getattr(default, key, None):
            pretrained_cfg[key] = getattr(default, key)
    config = {"architecture": arch, "num_classes": int(meta["num_classes"]),
              "num_features": int(num_features)}
    if meta.get("classes"):
        config["label_names"] = [str(c) for c in meta["classes"]]
    if model_args:
        config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg
    return config


def num_features(meta: dict) -> int:
    """The pooled width of the checkpoint's model, built (on the meta device) to read it."""
    import torch

    from .backbone import create_backbone

    with torch.device("meta"):

        return create_backbone(meta["arch"], meta["num_classes"],
                               **(meta.get("model_kwargs") or {})).num_features


def write_config(path: Path, meta: dict, model=None) -> Path:
    """Write the ``config.json`` of a checkpoint described by ``meta`` (its mlfd sidecar);
    ``model`` (the trained timm model, if at hand) saves building one for its width."""
    feats = model.num_features if model is not None else num_features(meta)
    write_text(Path(path), json.dumps(timm_config(meta, feats), indent=2) + "\n")
    return Path(path)
