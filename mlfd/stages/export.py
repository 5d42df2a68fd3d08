"""`mlfd export`: a trained student out of the workspace, as plain timm weights and the
``config.json`` that describes them (see mlfd.models.timm_config)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..engine.artifact import Artifact
from ..engine.checkpoint import load_meta
from ..errors import MlfdError
from ..models.timm_config import CONFIG_FILE, WEIGHTS_FILE, num_features, timm_config
from ..storage.diskio import write_text
from .common import trained_levels
from .distill import student_status


def _pick(ws, name: str, levels: int | None, force: bool):
    """(levels, status) of the student to export; one-line errors otherwise."""
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
    config = timm_config(meta, num_features(meta))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MlfdError(f"export target {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    tmp = weights.with_name(weights.name + ".tmp")
    shutil.copyfile(src / "last.safetensors", tmp)
    os.replace(tmp, weights)
    write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return {"dataset": entry.name, "levels": k, "status": "complete" if st.ok else st.state,
            "reason": st.reason, "source": str(src), "out": str(out),
            "files": [str(weights), str(out / CONFIG_FILE)], "config": config}
