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
from .common import install_budget, trained_levels
from .distill import student_status


def _pick(levels: int | None, force: bool, status_of, found: list[int],
          what: str, label: str, hint: str, staging, verb: str = "export"):
    """(levels, status) of the model to export (or to ``verb``: predict uses it; default:
    its highest complete level); one-line errors otherwise. ``status_of(k)``: its status
    at L``k``; ``found``: the levels present; ``staging(k)``: its artifact (for a run in
    progress)."""
    exportable = ("ok", "stale", "incomplete") if force else ("ok",)
    hint = hint + (f" --levels {levels}`" if levels else "`")
    if levels is not None:
        st = status_of(levels)
        if st.state in exportable:
            return levels, st
        if st.state == "missing":
            partial = staging(levels).partial()
            note = (f" (only an unfinished run, epoch {partial.get('epoch')}/"
                    f"{partial.get('epochs')})" if partial else "")
            raise MlfdError(f"no {what} at L{levels}{note}: {hint}")
        more = f" or pass --force to {verb} it anyway" if st.state in ("stale",
                                                                        "incomplete") else ""
        raise MlfdError(f"{label} L{levels} is {st.reason}: {hint}{more}")
    done = {k: status_of(k) for k in found}
    for states in (("ok",), exportable):
        ks = [k for k, st in done.items() if st.state in states]
        if ks:
            return max(ks), done[max(ks)]
    seen = "; ".join(f"L{k}: {st.reason}" for k, st in done.items()) or "none trained"
    more = f" (--force {verb}s a stale one)" if any(
        st.state in ("stale", "incomplete") for st in done.values()) else ""
    raise MlfdError(f"no complete {what} ({seen}): {hint}{more}")


def student_pick(ws, name: str, levels: int | None, force: bool, verb: str = "export"):
    """(levels, status) of dataset ``name``'s student: the highest complete level (or
    ``levels``); stale or incomplete ones only with ``force``."""
    return _pick(levels, force, lambda k: student_status(ws, name, k),
                 trained_levels(ws, "student", name), f"student of {name!r}", f"student {name}",
                 f"run `mlfd distill --dataset {name}",
                 lambda k: Artifact(ws.student_dir(name, k)), verb)


def _copy_weights(src: Path, out: Path) -> Path:
    """``src`` to ``out/model.safetensors``, atomically."""
    weights = out / WEIGHTS_FILE
    tmp = weights.with_name(weights.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, weights)
    return weights


def _out_dir(out) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MlfdError(f"export target {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_student(ws, name: str, out: Path, levels: int | None = None,
                   force: bool = False) -> dict:
    """Copy the student of dataset ``name`` (default: its highest complete level) to
    ``out/model.safetensors`` with ``out/config.json``; returns what was written."""
    install_budget(ws)  # budget-sized epochs are in the student's fingerprint: judge with them
    entry = ws.exp.entry(name)
    k, st = student_pick(ws, entry.name, levels, force)
    src = ws.student_dir(entry.name, k)
    meta = load_meta(src / "last")
    config = timm_config(meta, num_features(meta))
    out = _out_dir(out)
    weights = _copy_weights(src / "last.safetensors", out)
    write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return {"dataset": entry.name, "levels": k, "status": "complete" if st.ok else st.state,
            "reason": st.reason, "source": str(src), "out": str(out),
            "files": [str(weights), str(out / CONFIG_FILE)], "config": config}


def pick_amalgamated(ws, arch: str | None, levels: int | None, force: bool):
    """(arch, levels, status, directory, metadata) of the amalgamated student to use, by
    export's rule (``arch`` may be left out where the workdir has one); one-line errors."""
    from .amalgamate import amalgam_archs, amalgam_dir, amalgam_name, amalgam_status

    archs = amalgam_archs(ws)
    if arch is None:
        if len(archs) != 1:
            raise MlfdError("no amalgamated student in this workdir: run `mlfd distill "
                            "--amalgamate ARCH`" if not archs else
                            f"several amalgamated students ({', '.join(archs)}): pick one "
                            "with --arch")
        arch = archs[0]
    what = f"amalgamated {arch} student"
    k, st = _pick(levels, force, lambda k: amalgam_status(ws, arch, k),
                  trained_levels(ws, "student", amalgam_name(arch)), what, what,
                  f"run `mlfd distill --amalgamate {arch}",
                  lambda k: Artifact(amalgam_dir(ws, arch, k)))
    src = amalgam_dir(ws, arch, k)
    meta = load_meta(src / "last")
    if meta.get("datasets") != ws.exp.names():
        raise MlfdError(f"{what} L{k} was trained on other datasets ({meta.get('datasets')})")
    return arch, k, st, src, meta


def _classifier_keys(arch: str, num_classes: int, model_kwargs: dict) -> tuple[str, str]:
    """The state-dict keys (weight, bias) of ``arch``'s classifier: those a model with
    classes has and one without has not (built on the meta device)."""
    import torch

    from ..models import create_backbone

    with torch.device("meta"):
        with_head = create_backbone(arch, num_classes, **model_kwargs).state_dict()
        without = create_backbone(arch, 0, **model_kwargs).state_dict()
    extra = sorted(set(with_head) - set(without))
    weight = [k for k in extra if k.endswith(".weight")]
    bias = [k for k in extra if k.endswith(".bias")]
    if len(extra) != 2 or len(weight) != 1 or len(bias) != 1:
        raise MlfdError(f"cannot export one head of {arch}: its classifier is not one "
                        f"linear layer ({', '.join(extra) or 'no parameters'}); use --all-heads")
    return weight[0], bias[0]


def export_amalgamated(ws, name: str | None, out: Path, arch: str | None = None,
                       levels: int | None = None, force: bool = False,
                       all_heads: bool = False) -> dict:
    """An amalgamated student to ``out``. One head (dataset ``name``): a plain timm
    classifier of that dataset (``model.safetensors``, ``config.json``), loadable with
    ``timm.create_model("local-dir:OUT", pretrained=True)``. All heads: the backbone
    without classifier in ``model.safetensors`` (timm loads it, ``num_classes`` 0) and
    every head in ``heads.safetensors``. ``config.json``'s ``amalgamated`` says which heads
    the folder holds, with each head's classes and preprocessing."""
    from safetensors.torch import load_file, save_file

    install_budget(ws)

    from .amalgamate import heads_config

    names = ws.exp.names()
    if not all_heads and name is None:
        raise MlfdError("export of an amalgamated student takes --dataset NAME (its head) "
                        "or --all-heads")
    d = None if all_heads else names.index(ws.exp.entry(name).name)
    arch, k, st, src, meta = pick_amalgamated(ws, arch, levels, force)
    state = load_file(str(src / "last.safetensors"))
    backbone = {key[len("backbone."):]: v for key, v in state.items()
                if key.startswith("backbone.")}
    heads = {key: v for key, v in state.items() if key.startswith("heads.")}
    out = _out_dir(out)
    weights, files = out / WEIGHTS_FILE, []
    if all_heads:
        save_file(heads, str(out / "heads.safetensors"))
        files.append(str(out / "heads.safetensors"))
    else:
        w, b = _classifier_keys(arch, meta["num_classes"][d], meta.get("model_kwargs") or {})
        backbone[w], backbone[b] = heads[f"heads.{d}.weight"], heads[f"heads.{d}.bias"]
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(backbone, str(tmp))
    os.replace(tmp, weights)
    dim = heads["heads.0.weight"].shape[1]
    config = heads_config(meta, dim, None if all_heads else [d])
    write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return {"dataset": None if all_heads else names[d], "amalgamated": arch,
            "heads": [h["dataset"] for h in config["amalgamated"]["heads"]], "levels": k,
            "status": "complete" if st.ok else st.state, "reason": st.reason,
            "source": str(src), "out": str(out),
            "files": [str(weights), *files, str(out / CONFIG_FILE)], "config": config}
