"""`mlfd predict`: a trained student on image files, for shell pipelines.

A :class:`Predictor` is one model source: ``model`` (a normalised batch -> the dataset's
logits), the preprocessing `mlfd eval` applies (an :class:`InputSpec`: the whole image
resized bilinearly to the input size, the clean view 0, channels matched, normalised) and
the class names. Its constructors are the sources a user names:

* :meth:`Predictor.from_workdir`: a per-dataset student in a workdir, picked as
  `mlfd export` picks it (the highest complete level; stale or incomplete only with
  ``force``), with eval's own loader and input spec;
* :meth:`Predictor.from_export`: a folder `mlfd export` wrote (model.safetensors and
  config.json; its ``pretrained_cfg`` gives the preprocessing).

Another source (a multi-head model, say) is one more constructor that fills the same
fields; :meth:`Predictor.predict` does the rest. Files are decoded with the torch
pipeline's reader and resampled with its :func:`render`, so a file gives the logits eval
gives it on the torch pipeline (same device and precision). Nothing here writes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from ..data import formats
from ..data.pipelines import InputSpec, render
from ..data.views import ViewConfig, view_params
from ..engine.checkpoint import load_meta
from ..engine.loop import autocast
from ..engine.progress import progress
from ..errors import CorruptArtifact, MlfdError
from ..models import create_backbone
from ..models.timm_config import CONFIG_FILE, WEIGHTS_FILE
from ..workspace import Workspace
from .common import input_spec, install_budget
from .evaluate import load_student
from .export import student_pick


@dataclass
class Result:
    """One path's answer: its top classes, or why it has none."""

    path: str
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (index, label, prob)
    logits: torch.Tensor | None = None  # float32 on the CPU (for callers that want them)
    error: str | None = None


@dataclass
class Predictor:
    """A model with its preprocessing and class names (see the module docstring)."""

    model: Callable[[torch.Tensor], torch.Tensor]  # normalised (B, C, H, W) -> (B, classes)
    spec: InputSpec
    classes: list[str]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # autocast, as eval runs on this device (mlfd.fastpaths)
    source: str = ""  # what was loaded, in words

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_workdir(cls, ws: Workspace, dataset: str, levels: int | None = None,
                     force: bool = False, device: torch.device | str = "cpu",
                     precision: str = "fp32") -> Predictor:
        """The student of ``dataset`` in the workdir (default: its highest complete level),
        loaded and fed as `mlfd eval` does."""
        from .scan import recorded

        name = ws.exp.entry(dataset).name
        install_budget(ws)  # budget-sized epochs are part of the student's fingerprint
        recorded(ws, name)  # so is an earlier --skip-bad-images
        k, st = pick_student(ws, name, levels, force)
        device = torch.device(device)
        model = load_student(ws, name, k, device)
        meta = st.meta or load_meta(ws.student_dir(name, k) / "last")
        classes = _labels(meta.get("classes"), int(meta["num_classes"]))
        state = "" if st.ok else f", {st.state}"
        return cls(model, input_spec(ws, name), classes, device, precision,
                   f"{name} L{k} student{state}")

    @classmethod
    def from_amalgamated(cls, ws: Workspace, dataset: str, arch: str | None = None,
                         levels: int | None = None, force: bool = False,
                         device: torch.device | str = "cpu",
                         precision: str = "fp32") -> Predictor:
        """Head ``dataset`` of the workdir's amalgamated student (`mlfd distill
        --amalgamate`), picked as `mlfd export --amalgamated` picks it, fed as eval feeds it."""
        from .amalgamate import amalgam_spec, load_amalgam
        from .export import pick_amalgamated
        from .scan import recorded

        name = ws.exp.entry(dataset).name
        for n in ws.exp.names():  # every dataset's data is part of its fingerprint
            recorded(ws, n)
        arch, k, st, src, meta = pick_amalgamated(ws, arch, levels, force)
        d, device = ws.exp.names().index(name), torch.device(device)
        net = load_amalgam(src / "last", meta, device)
        state = "" if st.ok else f", {st.state}"
        return cls(lambda x: net(x, d), amalgam_spec(ws, name, int(meta["input_size"])),
                   _labels(meta["classes"][d], int(meta["num_classes"][d])), device, precision,
                   f"amalgamated {arch} L{k} student{state}, head {name}")

    @classmethod
    def from_export(cls, path: str | os.PathLike, dataset: str | None = None,
                    device: torch.device | str = "cpu", precision: str = "fp32") -> Predictor:
        """The model of an `mlfd export` folder, with the preprocessing its config.json
        gives. ``dataset`` picks a head where a folder holds several; a one-head folder
        takes none."""
        folder = Path(path)
        cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for p in (cfg_path, weights):
            if not p.is_file():
                raise MlfdError(f"--model {folder}: no {p.name} there (a folder written by "
                                "`mlfd export` holds model.safetensors and config.json)")
        try:
            cfg = json.loads(cfg_path.read_text())
            arch, n = str(cfg["architecture"]), int(cfg["num_classes"])
            pre = cfg["pretrained_cfg"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MlfdError(f"{cfg_path} is not a config.json mlfd export writes "
                            f"({e.__class__.__name__}: {e})") from None
        if cfg.get("amalgamated"):  # an amalgamated student's head(s): stages.amalgamate
            from .amalgamate import exported_head

            net, head = exported_head(folder, cfg, dataset)
            spec = export_spec(dict(pre, mean=head["mean"], std=head["std"]), cfg_path)
            return cls(net.to(device), spec, _labels(head["label_names"],
                                                     int(head["num_classes"])),
                       torch.device(device), precision,
                       f"{arch} head {head['dataset']} from {folder}")
        if dataset is not None:
            raise MlfdError(f"--model {folder} holds one model with one head: leave out "
                            "--dataset")
        spec = export_spec(pre, cfg_path)
        device = torch.device(device)
        model = create_backbone(arch, n, **(cfg.get("model_args") or {}))
        _load_weights(model, weights, f"the {arch} with {n} classes {cfg_path} describes")
        model.to(device).eval().requires_grad_(False)
        return cls(model, spec, _labels(cfg.get("label_names"), n), device, precision,
                   f"{arch} from {folder}")

    # ------------------------------------------------------------------ running

    def load(self, path: str) -> torch.Tensor:
        """One file as eval feeds it: (C, H, W) float32, normalised; MlfdError if unusable."""
        img = formats.read_image(path)  # unreadable files: one BadImage naming them
        # view 0 of any sample is the whole image, unflipped: eval's clean view
        p = view_params(0, np.zeros(1, np.int64), np.zeros(1, np.int64), img.shape[0],
                        img.shape[1], ViewConfig())
        return render(torch.from_numpy(img)[None], p.y0, p.x0, p.h, p.w, p.flip, self.spec)[0]

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.model(x.to(self.device)).float()

    def predict(self, paths: Iterable[str], batch_size: int = 64, topk: int = 1,
                total: int | None = None, workers: int | None = None) -> Iterator[list[Result]]:
        """Results in input order, one list per batch of ``batch_size`` paths (read lazily:
        paths from a pipe are answered while more arrive). A progress bar on stderr when it
        is a terminal; ``total`` sizes it."""
        if batch_size < 1:
            raise MlfdError(f"--batch-size must be >= 1, got {batch_size}")
        if not 1 <= topk <= len(self.classes):
            raise MlfdError(f"--topk {topk}: the model has {len(self.classes)} classes "
                            f"(choose 1..{len(self.classes)})")
        it = iter(paths)
        workers = workers or min(4, os.cpu_count() or 1)
        # PIL decodes and torch resamples without the GIL: threads overlap the files' reads
        # no bar while stdout is the terminal too: its lines would tear through the bar
        bar = Progress(disable=True) if _isatty(sys.stdout) else progress()
        with ThreadPoolExecutor(workers, thread_name_prefix="mlfd-predict") as pool, bar:
            task = bar.add_task("predict", total=total, items=0, info="", unit="img")
            done = 0
            while chunk := list(islice(it, batch_size)):
                yield self._batch(chunk, pool.map(self._load_safe, chunk), topk)
                done += len(chunk)
                bar.update(task, advance=len(chunk), items=done)

    def _load_safe(self, path: str) -> torch.Tensor | str:
        try:
            return self.load(path)
        except formats.BadImage as e:
            return e.reason or str(e)
        except MlfdError as e:  # e.g. an image whose channels the model cannot take
            return str(e)

    def _batch(self, paths: list[str], loaded, topk: int) -> list[Result]:
        loaded = list(loaded)
        good = [i for i, x in enumerate(loaded) if isinstance(x, torch.Tensor)]
        out = [Result(p, error=x if isinstance(x, str) else None)
               for p, x in zip(paths, loaded, strict=True)]
        if not good:
            return out
        logits = self.logits(torch.stack([loaded[i] for i in good])).cpu()
        probs = logits.double().softmax(1)
        top = logits.topk(topk, dim=1).indices  # as eval's top-1 counts (topk on logits)
        for row, i in enumerate(good):
            idx = top[row].tolist()
            out[i].logits = logits[row]
            out[i].top = [(c, self.classes[c], float(probs[row, c])) for c in idx]
        return out


def _load_weights(model: torch.nn.Module, weights: Path, what: str) -> None:
    """Strict load of an exported state dict (no mlfd sidecar beside it), one-line errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CorruptArtifact(f"{weights} is unreadable: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MlfdError(f"{weights} does not fit {what}: "
                        f"{str(e).splitlines()[0]}") from None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _labels(names, n: int) -> list[str]:
    """Class names (their indices as text where the model has none)."""
    names = [str(c) for c in names] if names else []
    return names if len(names) == n else [str(i) for i in range(n)]


def export_spec(pre: dict, where: Path) -> InputSpec:
    """The input spec of an exported ``pretrained_cfg``; only what mlfd export writes
    (the whole image, bilinear, no crop) is read, anything else is refused."""
    try:
        c, h, w = (int(v) for v in pre["input_size"])
        mean, std = tuple(float(v) for v in pre["mean"]), tuple(float(v) for v in pre["std"])
        crop, interp = float(pre.get("crop_pct", 1.0)), pre.get("interpolation", "bilinear")
    except (KeyError, TypeError, ValueError) as e:
        raise MlfdError(f"{where}: pretrained_cfg has no usable input_size/mean/std "
                        f"({e.__class__.__name__}: {e})") from None
    if crop != 1.0 or interp != "bilinear":
        raise MlfdError(f"{where}: pretrained_cfg asks for crop_pct {crop:g} and {interp} "
                        "resizing; mlfd predict applies what mlfd export writes (the whole "
                        "image, bilinear, crop_pct 1)")
    return InputSpec(size=(h, w), channels=c, mean=mean, std=std)


def pick_student(ws: Workspace, name: str, levels: int | None, force: bool):
    """(levels, status) of the student to load, by export's rule."""
    return student_pick(ws, name, levels, force, verb="use")


def tsv_line(r: Result, decimals: int = 4) -> str:
    """``path<TAB>label<TAB>prob`` (then a label and prob per further class), no newline."""
    return "\t".join([r.path, *(f"{lab}\t{p:.{decimals}f}" for _, lab, p in r.top)])


def json_line(r: Result) -> str:
    """One JSON Lines record: path, the top-1 label and prob, and the top-k list."""
    top = [{"label": lab, "index": c, "prob": p} for c, lab, p in r.top]
    return json.dumps({"path": r.path, "label": top[0]["label"], "prob": top[0]["prob"],
                       "topk": top})
