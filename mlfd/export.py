"""Self-describing students: timm / Hugging Face style ``config.json`` beside plain weights.

    <OUT>/model.safetensors   the student's timm state dict (what `mlfd eval` measures)
    <OUT>/config.json         architecture, num_classes, num_features, label_names,
                              model_args, pretrained_cfg (input size, mean/std, ...)

The folder loads with plain timm, no mlfd needed:
``timm.create_model("local-dir:OUT", pretrained=True)``, or with the config's values
(``pretrained_cfg_overlay=dict(config["pretrained_cfg"], file="OUT/model.safetensors")``).
The same config.json is written next to every promoted student (students/D/LK/).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .engine.checkpoint import load_meta
from .errors import MlfdError

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


def _num_features(meta: dict) -> int:
    from .models import create_backbone

    return create_backbone(meta["arch"], meta["num_classes"],
                           **(meta.get("model_kwargs") or {})).num_features


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def write_student_config(directory: Path, model=None) -> Path:
    """Write ``config.json`` for the student checkpoint ``directory/last``; ``model`` (the
    trained timm model, if at hand) saves building one to read its ``num_features``."""
    directory = Path(directory)
    meta = load_meta(directory / "last")
    feats = model.num_features if model is not None else _num_features(meta)
    path = directory / CONFIG_FILE
    _write_json(path, timm_config(meta, feats))
    return path


def _pick(ws, name: str, levels: int | None, force: bool):
    """(levels, status) of the student to export; one-line errors otherwise."""
    from .engine.artifact import Artifact
    from .stages.distill import student_status
    from .stages.evaluate import trained_levels

    exportable = ("ok", "stale", "incomplete") if force else ("ok",)
    hint = f"run `mlfd distill --dataset {name}" + (f" --levels {levels}`" if levels else "`")
    if levels is not None:
        st = student_status(ws, name, levels)
        if st.state in exportable:
            return levels, st
        if st.state == "missing":
            partial = Artifact(ws.student_dir(name, levels)).partial()
            note = (f" (only an unfinished run, epoch {partial.get('epoch')}/"
                    f"{partial.get('epochs')})" if partial else "")
            raise MlfdError(f"no student of {name!r} at L{levels}{note}: {hint}")
        more = " or pass --force to export it anyway" if st.state in ("stale",
                                                                        "incomplete") else ""
        raise MlfdError(f"student {name} L{levels} is {st.reason}: {hint}{more}")
    found = {k: student_status(ws, name, k) for k in trained_levels(ws, "student", name)}
    for states in (("ok",), exportable):
        ks = [k for k, st in found.items() if st.state in states]
        if ks:
            return max(ks), found[max(ks)]
    seen = "; ".join(f"L{k}: {st.reason}" for k, st in found.items()) or "none trained"
    more = " (--force exports a stale one)" if any(
        st.state in ("stale", "incomplete") for st in found.values()) else ""
    raise MlfdError(f"no complete student of {name!r} ({seen}): {hint}{more}")


def export_student(ws, name: str, out: Path, levels: int | None = None,
                   force: bool = False) -> dict:
    """Copy the student of dataset ``name`` (default: its highest complete level) to
    ``out/model.safetensors`` with ``out/config.json``; returns what was written."""
    entry = ws.exp.entry(name)
    k, st = _pick(ws, entry.name, levels, force)
    src = ws.student_dir(entry.name, k)
    meta = load_meta(src / "last")
    config = timm_config(meta, _num_features(meta))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MlfdError(f"export target {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    tmp = weights.with_name(weights.name + ".tmp")
    shutil.copyfile(src / "last.safetensors", tmp)
    os.replace(tmp, weights)
    _write_json(out / CONFIG_FILE, config)
    return {"dataset": entry.name, "levels": k, "status": "complete" if st.ok else st.state,
            "reason": st.reason, "source": str(src), "out": str(out),
            "files": [str(weights), str(out / CONFIG_FILE)], "config": config}
