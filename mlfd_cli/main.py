"""The `mlfd` command: maps options onto the stage functions of mlfd.stages."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from mlfd.errors import MlfdError


class _HelpFlag:
    """-h/--help as a bare flag: newer typer shows a Python type ('<bool>') beside it."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


class _Group(_HelpFlag, TyperGroup):
    pass


class _Command(_HelpFlag, TyperCommand):
    pass


app = typer.Typer(
    cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Multi-Level Feature Distillation: teach -> cache -> fuse -> distill -> eval.\n\n"
         "Example (embedded demo, CPU): mlfd distill --dataset fashion-mnist-mini --levels 2",
)
command = partial(app.command, cls=_Command)


def _version(value: bool) -> None:
    if value:
        from mlfd import __version__

        print(f"mlfd {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, metavar="",
        help="Print the version and exit.")] = False):
    pass


Workdir = Annotated[Path | None, typer.Option(
    "--workdir", "-w", metavar="DIR",
    help="Experiment directory (default: ./mlfd-runs/<preset>).")]
Datasets = Annotated[list[str] | None, typer.Option(
    "--dataset", "-d", metavar="NAME", help="Dataset name, path, or 'all' (repeatable).")]
Levels = Annotated[int | None, typer.Option(
    "--levels", "-k", metavar="K",
    help="Distil at L1..LK (teachers fused at LK); default from the experiment.")]
Device = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto | cpu | cuda")]
Seed = Annotated[int | None, typer.Option(
    "--seed", metavar="INTEGER", help="Seed (views, shuffles, init).")]
DataRoot = Annotated[str | None, typer.Option(
    "--data-root", envvar="MLFD_DATA", metavar="DIR",
    help="Where full datasets live / are downloaded.")]
# Flags get metavar="": typer >= 0.2x would print their Python type ('<bool>') in the help.
Json = Annotated[bool, typer.Option(
    "--json", metavar="", help="Print one JSON document on stdout.")]
Preset = Annotated[str | None, typer.Option(
    "--preset", metavar="NAME",
    help="demo | paper-t1 | paper-t2, for a workspace without an experiment yet.")]
Teacher = Annotated[list[str] | None, typer.Option(
    "--teacher", metavar="DATASET=ARCH",
    help="A teacher per dataset (repeatable): define a custom experiment.")]
InputSize = Annotated[int | None, typer.Option(
    "--input-size", metavar="PIXELS",
    help="Input resolution for --teacher experiments (default: the arch's).")]
Epochs = Annotated[int | None, typer.Option(
    "--epochs", metavar="N", help="Override epochs of every stage.")]
BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", metavar="N", help="Override batch sizes.")]
Lr = Annotated[float | None, typer.Option("--lr", metavar="FLOAT", help="Override learning rates.")]
Pipeline = Annotated[str, typer.Option(
    "--pipeline", metavar="PIPELINE", help="auto | dali | torch")]
LossBackend = Annotated[str | None, typer.Option(
    "--loss-backend", metavar="BACKEND",
    help="auto | torch | compile | triton (default: the experiment's).")]
Force = Annotated[bool, typer.Option(
    "--force", metavar="", help="Redo this stage even if it is up to date.")]
Restart = Annotated[bool, typer.Option(
    "--restart", metavar="", help="Train from scratch instead of resuming an interrupted run.")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", "-n", metavar="",
    help="Print what would run and why (and what is reused), then exit; writes nothing.")]


def _open(workdir, datasets, preset, teachers, input_size, seed, data_root, epochs, batch_size,
          lr, levels):
    """Resolve the workspace and apply per-run overrides (not written back to the file).

    Nothing is written here: the caller validates the whole run first, then ``_session``
    creates the workspace and takes its lock."""
    from mlfd.config import DatasetEntry, Experiment, resolve_source, short_name
    from mlfd.engine.progress import log
    from mlfd.presets import get_preset, preset_for_dataset
    from mlfd.workspace import EXPERIMENT_FILE, Workspace

    if preset and teachers:
        raise MlfdError("give either --preset or --teacher, not both")
    new = None
    if preset:
        new = get_preset(preset)
    elif teachers:
        entries = []
        for t in teachers:
            if "=" not in t:
                raise MlfdError(f"--teacher {t!r}: expected DATASET=ARCH")
            src, arch = (s.strip() for s in t.rsplit("=", 1))
            src = resolve_source(src, Path.cwd())  # stored absolute: works from anywhere
            entries.append(DatasetEntry(short_name(src), src, arch,
                                        input_size or _default_size(arch)))
        new = Experiment(preset="custom", datasets=entries)
    else:
        for d in datasets or []:
            if d != "all" and (p := preset_for_dataset(d)):
                new = get_preset(p)
                break
    if workdir is None:
        if (Path.cwd() / EXPERIMENT_FILE).exists():
            workdir = Path.cwd()
        else:
            workdir = Path("mlfd-runs") / (new.preset if new else "default")
        log(f"[mlfd] workspace: {workdir.resolve()}")
    if new is not None and seed is not None:
        new.seed = seed
    if new is not None and levels is not None:
        new.levels = levels
    exists = (Path(workdir) / EXPERIMENT_FILE).exists()
    if exists and (preset or teachers):
        current = Experiment.load(Path(workdir) / EXPERIMENT_FILE)
        if [(d.source, d.arch) for d in current.datasets] != [(d.source, d.arch) for d in
                                                              new.datasets]:
            raise MlfdError(f"{workdir} already holds another experiment; edit "
                            f"{workdir}/{EXPERIMENT_FILE} or choose another --workdir")
    ws = Workspace.open(Path(workdir), new, data_root)
    exp = ws.exp
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


def _default_size(arch: str) -> int:
    from mlfd.models.backbone import timm

    if not timm.is_model(arch):
        raise MlfdError(f"unknown timm architecture {arch!r} (see timm.list_models())")
    return int(timm.get_pretrained_cfg(arch).input_size[-1]) if timm.get_pretrained_cfg(arch) \
        else 224


PIPELINES = ("auto", "dali", "torch")


def _opts(device, pipeline="auto", loss_backend=None, force=False, restart=False):
    """Per-run options, validated before anything is read or written."""
    from mlfd.device import select_device
    from mlfd.stages import RunOptions

    dev = select_device(device)
    if pipeline not in PIPELINES:
        raise MlfdError(f"unknown --pipeline {pipeline!r}: choose {', '.join(PIPELINES)}")
    if loss_backend is not None:
        from mlfd.losses import resolve_backend

        resolve_backend(loss_backend, dev)
    return RunOptions(device=dev, pipeline=pipeline, loss_backend=loss_backend, force=force,
                      restart=restart)


def _check(ws, opts, levels=None) -> None:
    """Check what needs data and models; nothing is written."""
    from mlfd.stages.cache import check_levels
    from mlfd.stages.common import dataset_of

    for e in ws.exp.datasets:
        dataset_of(ws, e.name)  # exists, readable, >= 2 classes
        _default_size(e.arch)  # a timm architecture
    if levels is not None:
        check_levels(ws, levels)
    if opts.loss_backend is None and levels is not None:
        from mlfd.losses import resolve_backend

        resolve_backend(ws.exp.distill.loss_backend, opts.device)


@contextlib.contextmanager
def _session(ws, opts, levels=None):
    """Check the run, then create the workspace and hold its lock."""
    _check(ws, opts, levels)
    with ws.locked():
        ws.create()
        yield ws


def _names(ws, datasets) -> list[str]:
    if not datasets or "all" in datasets:
        return ws.exp.names()
    return [ws.exp.entry(d).name for d in datasets]


def _levels(ws, levels) -> int:
    k = ws.exp.levels if levels is None else levels
    if k < 1:
        raise MlfdError(f"--levels must be >= 1, got {k}")
    return k


def _emit(as_json: bool, doc: dict, rows: list[dict] | None = None) -> None:
    from rich.console import Console

    from mlfd.report import rich_table

    if rows is not None:
        console = Console(stderr=as_json)
        if not console.is_terminal:
            console.width = max(console.width, 110)  # logs and CI: keep rows on one line
        console.print(rich_table(rows))
    if as_json:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")


def _set_imports(ws, imports: list[str]) -> list[str]:
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


def _dry_run(ws, opts, levels, as_json: bool, planner, *args) -> None:
    """Check the run as a real one would, then print its plan: no lock, nothing written."""
    from mlfd.engine.staging import set_read_only
    from mlfd.stages.plan import announce

    set_read_only()  # no lock is held: leave any other run's files as they are
    _check(ws, opts, levels)
    plan = planner(ws, *args)
    write = partial(print, file=sys.stderr if as_json else sys.stdout)
    announce(ws, plan, write)
    write("[plan] dry run: nothing was run or written")
    if as_json:
        sys.stdout.write(json.dumps({"dry_run": True, "workdir": str(ws.root),
                                     "steps": [vars(s) for s in plan.steps],
                                     "reused": [vars(s) for s in plan.reused]}) + "\n")


def _report(ws, opts) -> tuple[list[dict], dict]:
    from mlfd.report import write_reports
    from mlfd.stages import evaluate

    rows = evaluate(ws, opts)
    return rows, write_reports(ws, rows)


@command()
def teach(workdir: Workdir = None, dataset: Datasets = None, device: Device = "auto",
          seed: Seed = None, data_root: DataRoot = None, json_out: Json = False,
          preset: Preset = None, teacher: Teacher = None, input_size: InputSize = None,
          epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None,
          pipeline: Pipeline = "auto", force: Force = False, restart: Restart = False,
          dry_run: DryRun = False,
          baseline: Annotated[str | None, typer.Option(
              "--baseline", metavar="KIND", help="multi-head | joint-head: train a "
                                                 "multi-dataset baseline instead of the teachers.")]
          = None,
          arch: Annotated[str | None, typer.Option(
              "--arch", metavar="ARCH",
              help="Architecture of the --baseline (default: the first teacher's).")] = None,
          auto_augment: Annotated[str | None, typer.Option(
              "--auto-augment", metavar="POLICY", help="imagenet | none: AutoAugment policy for "
                                                       "teacher training (default: the "
                                                       "experiment's).")] = None,
          imports: Annotated[list[str] | None, typer.Option(
              "--import", metavar="DATASET=CHECKPOINT",
              help="Use a trained teacher instead of training one: a state-dict file "
                   "(.safetensors, .pt/.pth/.bin) of the dataset's architecture and classes; "
                   "it is evaluated and recorded in experiment.yaml (repeatable).")] = None):
    """Train the dataset-specific teachers (all, or those given with --dataset).

    Up-to-date teachers are kept (--force retrains); an interrupted run resumes.
    With --import the teacher is loaded from a checkpoint instead (paper 3).

    Examples:\n
      mlfd teach --preset demo --dataset mnist-mini --epochs 2\n
      mlfd teach --workdir mlfd-runs/demo --baseline joint-head --arch test_convnext\n
      mlfd teach --workdir mlfd-runs/demo --import mnist-mini=./mnist-teacher.pth
    """
    from mlfd.data.pipeline import check_auto_augment
    from mlfd.engine.progress import log
    from mlfd.stages import teach as run
    from mlfd.stages.baselines import KINDS, train_baseline
    from mlfd.stages.plan import plan_baseline, plan_teach

    opts = _opts(device, pipeline, force=force, restart=restart)
    ws = _open(workdir, dataset, preset, teacher, input_size, seed, data_root, epochs, batch_size,
               lr, None)
    if auto_augment is not None:
        policy = None if auto_augment.lower() == "none" else auto_augment
        ws.exp.teach.auto_augment = check_auto_augment(policy)
    if baseline and baseline not in KINDS:
        raise MlfdError(f"unknown --baseline {baseline!r}: choose {', '.join(KINDS)}")
    if arch is not None:
        _default_size(arch)
    names = _names(ws, dataset)
    changed = _set_imports(ws, imports or [])
    if changed:
        names = [n for n in names if n in changed] if dataset else changed
    if dry_run and baseline:
        return _dry_run(ws, opts, None, json_out, plan_baseline, baseline, arch, input_size,
                        force, restart)
    if dry_run:
        return _dry_run(ws, opts, None, json_out, plan_teach, names, force, restart)
    with _session(ws, opts):
        if changed:
            ws.record_imports(changed)  # the experiment now names these checkpoints
        if baseline:
            plan = plan_baseline(ws, baseline, arch, input_size, force, restart)
            res = {}
            for s in plan.reused:
                log(f"[teach] {s.target}: up to date (--force retrains)")
            for s in plan.steps:
                log(f"[teach] {s.target}: {s.reason}")
                res = train_baseline(ws, opts, baseline, arch, input_size)
            _emit(json_out, {"workdir": str(ws.root), "baseline": baseline, "metrics": res})
            return
        plan, results = plan_teach(ws, names, force, restart), {}
        for s in plan.reused:
            log(f"[teach] {s.target}: up to date (--force retrains)")
        for s in plan.steps:
            log(f"[teach] {s.target}: {s.reason}")
            results[s.target] = run(ws, opts, s.target)
    _emit(json_out, {"workdir": str(ws.root), "trained": results})


@command()
def cache(workdir: Workdir = None, levels: Levels = None, device: Device = "auto",
          seed: Seed = None, data_root: DataRoot = None, json_out: Json = False,
          preset: Preset = None, dataset: Datasets = None, pipeline: Pipeline = "auto",
          force: Force = False, restart: Restart = False, dry_run: DryRun = False):
    """Cache teacher embeddings at L_K for all datasets; then joint targets if `fuse` ran.

    Missing, stale or corrupt groups are (re)written; an interrupted extraction resumes
    at its last complete chunk.

    Example: mlfd cache --workdir mlfd-runs/demo --levels 2
    """
    from mlfd.stages import cache_targets, cache_teachers
    from mlfd.stages.fuse import joint_status
    from mlfd.stages.plan import plan_cache

    opts = _opts(device, pipeline, force=force, restart=restart)
    ws = _open(workdir, dataset, preset, None, None, seed, data_root, None, None, None, levels)
    k = _levels(ws, levels)
    if dry_run:
        return _dry_run(ws, opts, k, json_out, plan_cache, k, force)
    with _session(ws, opts, k):
        done = {"teachers": cache_teachers(ws, opts, k), "targets": []}
        if joint_status(ws, k).ok:
            done["targets"] = cache_targets(ws, opts, k)
    _emit(json_out, {"workdir": str(ws.root), "levels": k, "written": done})


@command()
def fuse(workdir: Workdir = None, levels: Levels = None, device: Device = "auto",
         seed: Seed = None, data_root: DataRoot = None, json_out: Json = False,
         preset: Preset = None, epochs: Epochs = None, batch_size: BatchSize = None,
         lr: Lr = None, force: Force = False, restart: Restart = False,
         dry_run: DryRun = False):
    """Train the joint teacher on the cached teacher embeddings of all datasets.

    An up-to-date joint teacher is kept (--force retrains); an interrupted run resumes.

    Example: mlfd fuse --workdir mlfd-runs/demo --levels 2 --epochs 10
    """
    from mlfd.engine.progress import log
    from mlfd.stages import fuse as run
    from mlfd.stages.fuse import joint_status
    from mlfd.stages.plan import plan_fuse

    opts = _opts(device, force=force, restart=restart)
    ws = _open(workdir, None, preset, None, None, seed, data_root, epochs, batch_size, lr, levels)
    k = _levels(ws, levels)
    if dry_run:
        return _dry_run(ws, opts, k, json_out, plan_fuse, k, force, restart)
    with _session(ws, opts, k):
        st = joint_status(ws, k)
        if st.ok and not force:
            log(f"[fuse] joint teacher L{k}: up to date (--force retrains)")
            res = st.meta.get("metrics", {})
        else:
            log(f"[fuse] joint teacher L{k}: {st.reason}")
            res = run(ws, opts, k)
    _emit(json_out, {"workdir": str(ws.root), "levels": k, "metrics": res})


@command()
def distill(workdir: Workdir = None, dataset: Datasets = None, levels: Levels = None,
            device: Device = "auto", seed: Seed = None, data_root: DataRoot = None,
            json_out: Json = False, preset: Preset = None, teacher: Teacher = None,
            input_size: InputSize = None, epochs: Epochs = None, batch_size: BatchSize = None,
            lr: Lr = None, pipeline: Pipeline = "auto", loss_backend: LossBackend = None,
            force: Force = False, restart: Restart = False, dry_run: DryRun = False):
    """Distil students; first runs (and announces) any missing or stale teach/cache/fuse step.

    Up-to-date results are reused; the plan says why each step runs. Interrupted
    training resumes from its last finished epoch (--restart starts over).

    Examples:\n
      mlfd distill --dataset fashion-mnist-mini --levels 2\n
      mlfd distill --dataset all --levels 1 --workdir mlfd-runs/demo\n
      mlfd distill --teacher data/a.npz=resnet18 --teacher data/b=efficientnet_b0 --dataset a
    """
    from mlfd.stages import plan_distill, run_distill

    opts = _opts(device, pipeline, loss_backend, force, restart)
    ws = _open(workdir, dataset, preset, teacher, input_size, seed, data_root, epochs, batch_size,
               lr, levels)
    k = _levels(ws, levels)
    names = _names(ws, dataset)
    if dry_run:
        return _dry_run(ws, opts, k, json_out, plan_distill, names, k, force, restart)
    with _session(ws, opts, k):
        steps = run_distill(ws, opts, names, k)
        rows, reports = _report(ws, opts)
    _emit(json_out, {"workdir": str(ws.root), "levels": k,
                     "steps": [vars(s) for s in steps], "rows": rows, "reports": reports}, rows)


@command("eval")
def eval_(workdir: Workdir = None, device: Device = "auto", data_root: DataRoot = None,
          json_out: Json = False, pipeline: Pipeline = "auto"):
    """Top-1/top-5 of every complete model and the paper-style comparison table.

    Incomplete, corrupt or stale results are listed with their status, never as results.

    Example: mlfd eval --workdir mlfd-runs/demo --json
    """
    from mlfd.engine.staging import set_read_only

    opts = _opts(device, pipeline)
    ws = _open(workdir, None, None, None, None, None, data_root, None, None, None, None)
    set_read_only()  # eval takes no lock: it must not touch a running stage's files
    rows, reports = _report(ws, opts)
    _emit(json_out, {"workdir": str(ws.root), "rows": rows, "reports": reports}, rows)


@command()
def info(json_out: Json = False):
    """Versions and which fast paths (CUDA, Triton kernel, DALI GPU) are active."""
    from mlfd.info import collect

    doc = collect()
    if json_out:
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="mlfd info", show_header=False)
    for k, v in doc.items():
        t.add_row(k, str(v))
    Console().print(t)


def main() -> None:
    """Exit codes: 0 ok, 1 internal error (a bug), 2 bad input or state, 3 filesystem,
    4 workdir in use by another run, 130 interrupted."""
    from mlfd.engine.staging import set_read_only

    usage_errors, no_args, aborts = _click_exceptions()
    set_read_only(False)  # per command (tests run many in one process)
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into Exit(130)
            raise KeyboardInterrupt
        sys.exit(code if isinstance(code, int) else 0)
    except no_args as e:  # the rich help is printed while the error is made; plain is not
        if e.format_message():
            print(e.format_message())
        sys.exit(0)
    except usage_errors as e:  # usage errors: one line, like every other error
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except MlfdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, *aborts):
        from mlfd.engine.staging import interrupt_note

        note = interrupt_note()
        print("interrupted: finished results are kept"
              + (f"; {note}" if note else ""), file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        print(f"error: {_os_error(e)}", file=sys.stderr)
        sys.exit(3)
    except Exception as e:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("MLFD_DEBUG"):
            raise
        print(f"internal error: {e.__class__.__name__}: {e} (set MLFD_DEBUG=1 for a traceback)",
              file=sys.stderr)
        sys.exit(1)


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(usage errors, no-args-help, aborts) of click and of the click copy that newer typer
    releases vendor as ``typer._click``."""
    import click

    mods = [click.exceptions]
    with contextlib.suppress(ImportError):
        from typer._click import exceptions as vendored

        mods.append(vendored)
    pick = lambda name: tuple(getattr(m, name) for m in mods if hasattr(m, name))  # noqa: E731
    return pick("ClickException"), pick("NoArgsIsHelpError"), pick("Abort")


def _os_error(e: OSError) -> str:
    """The filesystem's refusal in one line, naming the path."""
    what = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.ENOTDIR: "not a directory", errno.EDQUOT: "disk quota exceeded"}
    reason = what.get(e.errno, e.strerror or str(e))
    path = e.filename or ""
    return f"{reason}: {path}" if path else reason


if __name__ == "__main__":
    main()
