"""What the verbs share: the workdir and experiment a command works on, its run options,
the check before a run and the lock around it, and how results are printed."""

from __future__ import annotations

import contextlib
import json
import sys
from functools import partial
from pathlib import Path

from mlfd.errors import MlfdError


def open_workdir(workdir, datasets, preset, teachers, input_size, seed, data_root, epochs,
                 batch_size, lr, levels, holdout=None, trust_data=False):
    """Resolve the workspace and apply per-run overrides (not written back to the file).

    Nothing is written here: the caller validates the whole run first, then ``locked``
    creates the workspace and takes its lock."""
    from mlfd.config import DatasetEntry, Experiment, resolve_source, short_name
    from mlfd.data.datasets import set_trust_data
    from mlfd.presets import get_preset, preset_for_dataset
    from mlfd.workspace import EXPERIMENT_FILE, Workspace

    set_trust_data(trust_data)  # per command (tests run many in one process)

    _check_options(seed=seed, levels=levels, holdout=holdout, input_size=input_size,
                   epochs=epochs, batch_size=batch_size, lr=lr)
    if preset and teachers:
        raise MlfdError("give either --preset or --teacher, not both")
    new, flips = None, {}
    if preset:
        new = get_preset(preset)
    elif teachers:
        entries = []
        for t in teachers:
            if "=" not in t:
                raise MlfdError(f"--teacher {t!r}: expected DATASET=ARCH[:noflip]")
            src, arch = (s.strip() for s in t.rsplit("=", 1))
            arch, hflip = _flip_suffix(arch)
            src = resolve_source(src, Path.cwd())  # stored absolute: works from anywhere
            size = default_size(arch)  # a timm architecture: no other suffix, no path
            entries.append(DatasetEntry(short_name(src), src, arch,
                                        size if input_size is None else input_size,
                                        hflip=True if hflip is None else hflip))
            if hflip is not None:
                flips[src] = hflip
        new = Experiment(preset="custom", datasets=entries)
    else:
        for d in datasets or []:
            if d != "all" and (p := preset_for_dataset(d)):
                new = get_preset(p)
                break
    if workdir is None:
        workdir = find_workdir(new)
    if new is None and not (Path(workdir) / EXPERIMENT_FILE).exists():
        _check_known(datasets or [], workdir)
    if new is not None and seed is not None:
        new.seed = seed
    if new is not None and levels is not None:
        new.levels = levels
    if new is not None and holdout is not None:
        new.holdout = holdout
    exists = (Path(workdir) / EXPERIMENT_FILE).exists()
    if exists and (preset or teachers):
        current = Experiment.load(Path(workdir) / EXPERIMENT_FILE)
        if [(d.source, d.arch) for d in current.datasets] != [(d.source, d.arch) for d in
                                                              new.datasets] or \
                any(d.hflip != flips[d.source] for d in current.datasets if d.source in flips):
            raise MlfdError(f"{workdir} already holds another experiment; edit "
                            f"{workdir}/{EXPERIMENT_FILE} or choose another --workdir")
    ws = Workspace.open(Path(workdir), new, data_root)
    ws.exp.check_locations(ws.root)
    exp = ws.exp
    if holdout is not None and exp.holdout != holdout:
        raise MlfdError(f"--holdout {holdout:g}: {workdir} already holds an experiment with "
                        f"holdout {exp.holdout:g}; choose another --workdir")
    if seed is not None:
        exp.seed = seed
    exp.override(epochs=epochs, batch_size=batch_size, lr=lr)
    try:
        exp.validate()
    except MlfdError as e:  # name the option when an override is what is wrong
        for flag, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--lr", lr)):
            if value is not None and flag[2:].replace("-", "_") in str(e):
                raise MlfdError(f"{flag} {value}: {e}") from None
        raise
    return ws


def _check_options(**values) -> None:
    """Command-line values go through the experiment's schema, before anything is read."""
    from mlfd.config import DatasetEntry, Experiment, TrainConfig, check_value

    owners = {"seed": Experiment, "levels": Experiment, "holdout": Experiment,
              "input_size": DatasetEntry, "epochs": TrainConfig, "batch_size": TrainConfig,
              "lr": TrainConfig}
    for key, value in values.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if why := check_value(owners[key], key, value):
            raise MlfdError(f"{flag} {value}: expected {why}, got {value}")
        if key == "holdout" and not 0 <= value < 1:  # the schema leaves this range to validate
            raise MlfdError(f"{flag} {value:g}: expected a fraction in [0, 1), got {value:g}")


def set_cache_uri(ws, uri: str | None) -> None:
    """Apply --cache-uri (checked here; a run that writes saves it in experiment.yaml)."""
    if uri is None:
        return
    from mlfd.storage.uri import check_uri

    if why := check_uri(uri):
        raise MlfdError(f"--cache-uri {uri}: {why}")
    if uri and "://" not in uri:  # stored absolute, like dataset sources
        uri = str(Path(uri).expanduser().resolve())
    ws.exp.cache.uri = uri or None  # '': back to <workdir>/cache
    ws.exp.check_locations(ws.root)


def images(max_image_pixels: int | None, drop_empty_classes: bool) -> None:
    """Apply --max-image-pixels and --drop-empty-classes (per command: tests run many in one
    process); before the datasets are listed."""
    from mlfd.data.formats import set_image_policy

    set_image_policy(max_image_pixels, drop_empty_classes)


FLIP_SUFFIXES = {":noflip": False, ":flip": True}


def _flip_suffix(arch: str) -> tuple[str, bool | None]:
    """``ARCH:noflip`` / ``ARCH:flip`` -> (ARCH, hflip); a bare ARCH -> (ARCH, None)."""
    for suffix, hflip in FLIP_SUFFIXES.items():
        if arch.endswith(suffix):
            return arch[: -len(suffix)].strip(), hflip
    return arch, None


def find_workdir(new) -> Path:
    """The workdir of a command without --workdir: ./ if it holds an experiment; else
    mlfd-runs/<preset> when a preset or --teacher defines the experiment; else the only
    experiment under mlfd-runs/ (several: an error naming them); else mlfd-runs/default."""
    from mlfd.engine.progress import log
    from mlfd.workspace import EXPERIMENT_FILE, RUNS_DIR, find_experiments

    note = ""
    if (Path.cwd() / EXPERIMENT_FILE).exists():
        workdir = Path.cwd()
    elif new is not None:
        workdir = RUNS_DIR / new.preset
    else:
        found = find_experiments(RUNS_DIR)
        if len(found) > 1:
            raise MlfdError(f"{len(found)} experiments under {RUNS_DIR}/ ("
                            + ", ".join(str(p) for p in found)
                            + "): choose one with --workdir")
        workdir = found[0] if found else RUNS_DIR / "default"
        note = f" (the only experiment under {RUNS_DIR}/)" if found else ""
    log(f"[mlfd] workspace: {workdir.resolve()}{note}")
    return workdir


def _check_known(datasets: list[str], workdir: Path) -> None:
    """Without an experiment, a --dataset must be a preset's, a registered one or a path."""
    from mlfd.data.datasets import list_datasets
    from mlfd.presets import PRESETS

    for d in datasets:
        if d == "all" or d in list_datasets() or Path(d).expanduser().exists():
            continue
        known = ", ".join(dict.fromkeys(n for make in PRESETS.values() for n in make().names()))
        raise MlfdError(f"unknown dataset {d!r}: no preset has it ({known}) and {workdir} "
                        "holds no experiment to look it up in; start one with --teacher "
                        "DATASET=ARCH (twice or more) or pass --workdir")


def default_size(arch: str) -> int:
    from mlfd.models.backbone import timm

    if not timm.is_model(arch):
        raise MlfdError(f"unknown timm architecture {arch!r} (see timm.list_models())")
    return int(timm.get_pretrained_cfg(arch).input_size[-1]) if timm.get_pretrained_cfg(arch) \
        else 224


PIPELINES = ("auto", "dali", "torch")


LOGS = ("tensorboard",)


def opts(device, pipeline="auto", loss_backend=None, force=False, restart=False, log=None):
    """Per-run options, validated before anything is read or written."""
    from mlfd.engine.device import select_device
    from mlfd.engine.metrics import set_tensorboard
    from mlfd.stages import RunOptions

    if log is not None and log not in LOGS:
        raise MlfdError(f"unknown --log {log!r}: choose {', '.join(LOGS)}")
    if log == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise MlfdError("--log tensorboard needs the tensorboard package: "
                            "pip install tensorboard") from None
    set_tensorboard(log == "tensorboard")

    dev = select_device(device)
    if pipeline not in PIPELINES:
        raise MlfdError(f"unknown --pipeline {pipeline!r}: choose {', '.join(PIPELINES)}")
    if loss_backend is not None:
        from mlfd.losses import resolve_backend

        resolve_backend(loss_backend, dev)
    return RunOptions(device=dev, pipeline=pipeline, loss_backend=loss_backend, force=force,
                      restart=restart, log=log)


def check(ws, opts, levels=None) -> None:
    """Check what needs data and models; nothing is written."""
    from mlfd.config import check_model_kwargs
    from mlfd.stages.cache import check_levels
    from mlfd.stages.common import dataset_of

    for i, e in enumerate(ws.exp.datasets):
        dataset_of(ws, e.name)  # exists, readable, >= 2 classes
        default_size(e.arch)  # a timm architecture
        check_model_kwargs(e, i)  # that its model takes
    if levels is not None:
        check_levels(ws, levels)
    if opts.loss_backend is None and levels is not None:
        from mlfd.losses import resolve_backend

        resolve_backend(ws.exp.distill.loss_backend, opts.device)
    from mlfd.fastpaths import check_explicit  # on CUDA: an explicit choice must have passed

    check_explicit(opts, ws.exp.distill.loss_backend if levels is not None else None)


@contextlib.contextmanager
def locked(ws, opts, levels=None):
    """Check the run, then create the workspace and hold its lock.

    Under torchrun rank 0 checks first (fetching any data), then the others; only rank 0
    locks and writes, and the lock is held until every rank is done."""
    from mlfd.engine.distributed import barrier, is_main

    if is_main():
        check(ws, opts, levels)
    barrier()
    if not is_main():
        check(ws, opts, levels)
    with ws.locked() if is_main() else contextlib.nullcontext(ws):
        if is_main():
            ws.create()
        barrier()  # experiment.yaml is written before any rank reads state
        yield ws
        barrier()


def names(ws, datasets) -> list[str]:
    if not datasets or "all" in datasets:
        return ws.exp.names()
    return [ws.exp.entry(d).name for d in datasets]


def levels(ws, levels) -> int:
    k = ws.exp.levels if levels is None else levels
    if k < 1:
        raise MlfdError(f"--levels must be >= 1, got {k}")
    return k


def emit(as_json: bool, doc: dict, rows: list[dict] | None = None) -> None:
    from rich.console import Console

    from mlfd.engine.distributed import is_main
    from mlfd.report import rich_table, weaker_joint_lines

    if not is_main():  # under torchrun rank 0 speaks for the run
        return
    if rows is not None:
        Console(stderr=as_json).print(rich_table(rows))  # fits 80 columns
        for line in weaker_joint_lines(rows):
            print(f"note: {line}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")


def set_imports(ws, imports: list[str]) -> list[str]:
    """Apply --import DATASET=CHECKPOINT to the experiment (in memory) after checking the
    file loads into the dataset's architecture; returns the datasets it names."""
    from mlfd.models import build_level_backbone
    from mlfd.stages.common import dataset_of
    from mlfd.stages.teach import read_state_dict

    names = []
    for item in imports:
        if "=" not in item:
            raise MlfdError(f"--import {item!r}: expected DATASET=CHECKPOINT")
        name, path = (s.strip() for s in item.split("=", 1))
        entry = ws.exp.entry(name)
        path = str(Path(path).expanduser().resolve())
        model = build_level_backbone(entry, dataset_of(ws, entry.name).num_classes)
        try:
            model.model.load_state_dict(read_state_dict(path), strict=True)
        except RuntimeError as e:
            raise MlfdError(f"--import {item}: the checkpoint does not fit {entry.arch} with "
                            f"{dataset_of(ws, entry.name).num_classes} classes: "
                            f"{str(e).splitlines()[0]}") from None
        entry.teacher = path
        names.append(entry.name)
    return names


def dry_run(ws, opts, levels, as_json: bool, planner, *args) -> None:
    """Check the run as a real one would, then print its plan: no lock, nothing written."""
    from mlfd.data.download import no_fetch
    from mlfd.engine.distributed import is_main
    from mlfd.stages.plan import announce
    from mlfd.storage.staging import set_read_only

    set_read_only()  # no lock is held: leave any other run's files as they are
    if not is_main():  # under torchrun rank 0 prints the plan
        return
    with no_fetch():  # data that is not there is planned for, not downloaded
        check(ws, opts, levels)
        plan = planner(ws, *args)
    write = partial(print, file=sys.stderr if as_json else sys.stdout)
    announce(ws, plan, write)
    write("[plan] dry run: nothing was run or written")
    if as_json:
        sys.stdout.write(json.dumps({"dry_run": True, "workdir": str(ws.root),
                                     "steps": [vars(s) for s in plan.steps],
                                     "reused": [vars(s) for s in plan.reused]}) + "\n")


def report(ws, opts, plots: bool = False) -> tuple[list[dict], dict]:
    from mlfd.engine.distributed import is_main
    from mlfd.report import write_reports
    from mlfd.stages import evaluate

    rows = evaluate(ws, opts)  # under torchrun: every rank, each its shard of the test sets
    if not is_main():
        return rows, {}
    reports = write_reports(ws, rows)
    if plots:  # embedding maps and confusion matrices, linked from results.md
        from mlfd.stages.embeddings import write_plots

        reports.update(write_plots(ws, opts, Path(reports["markdown"])))
    return rows, reports
