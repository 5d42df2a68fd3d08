"""The `mlfd` command: maps options onto the stage functions of mlfd.stages."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
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
    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:  # an argument's metavar (OUT) says it all: no '<path>' beside it
            if p.param_type_name == "argument" and p.metavar:
                p.display_type_rich = lambda ctx: None
        return params


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
    help="Experiment directory (default: ./ if it holds experiment.yaml, else "
         "./mlfd-runs/<preset>, or the only experiment under ./mlfd-runs/).")]
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
TrustData = Annotated[bool, typer.Option(
    "--trust-data", metavar="",
    help="Read pickle-based dataset files (MNIST's mnist.pkl.gz, CIFAR, Animal-MNIST) even "
         "when they are not the published files (e.g. your own re-encoded copy); they are "
         "still read with a restricted unpickler.")]
# Flags get metavar="": typer >= 0.2x would print their Python type ('<bool>') in the help.
Json = Annotated[bool, typer.Option(
    "--json", metavar="", help="Print one JSON document on stdout.")]
Preset = Annotated[str | None, typer.Option(
    "--preset", metavar="NAME",
    help="demo | trio | paper-t1 | paper-t2, for a workspace without an experiment yet.")]
Teacher = Annotated[list[str] | None, typer.Option(
    "--teacher", metavar="DATASET=ARCH",
    help="A teacher per dataset (repeatable): define a custom experiment. ARCH:noflip "
         "keeps that dataset's views unmirrored (digits, text).")]
InputSize = Annotated[int | None, typer.Option(
    "--input-size", metavar="PIXELS",
    help="Input resolution for --teacher experiments (default: the arch's).")]
Epochs = Annotated[int | None, typer.Option(
    "--epochs", metavar="N", help="Override epochs of every stage.")]
BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", metavar="N", help="Override batch sizes.")]
Lr = Annotated[float | None, typer.Option("--lr", metavar="FLOAT", help="Override learning rates.")]
Holdout = Annotated[float | None, typer.Option(
    "--holdout", metavar="FRACTION",
    help="New experiment: hold out this class-stratified fraction of every training split "
         "(a fixed draw) and measure on it instead of the test split, to choose a recipe "
         "without the test set; saved in experiment.yaml.")]
Pipeline = Annotated[str, typer.Option(
    "--pipeline", metavar="PIPELINE", help="auto | dali | torch")]
LossBackend = Annotated[str | None, typer.Option(
    "--loss-backend", metavar="BACKEND",
    help="auto | torch | compile | triton (default: the experiment's).")]
Precision = Annotated[str, typer.Option(
    "--precision", metavar="PRECISION",
    help="auto | bf16 | fp16 | fp32: training precision (fp16 with a GradScaler). auto: fp32 "
         "on CPU; on CUDA bf16, else fp16, else fp32, whichever passed `mlfd info --check`.")]
Force = Annotated[bool, typer.Option(
    "--force", metavar="", help="Redo this stage even if it is up to date.")]
Restart = Annotated[bool, typer.Option(
    "--restart", metavar="", help="Train from scratch instead of resuming an interrupted run.")]
LogTo = Annotated[str | None, typer.Option(
    "--log", metavar="BACKEND",
    help="tensorboard: also write TensorBoard event files into each training run's "
         "directory (needs `pip install tensorboard`).")]
CacheUri = Annotated[str | None, typer.Option(
    "--cache-uri", metavar="URL",
    help="Where the caches live: a directory or an fsspec URL (file://..., s3://bucket/prefix "
         "with s3fs installed); saved in experiment.yaml (default: <workdir>/cache).")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", "-n", metavar="",
    help="Print what would run and why (and what is reused), then exit; writes nothing.")]
Nproc = Annotated[int | None, typer.Option(
    "--nproc", metavar="N",
    help="Run in N processes (one per GPU on CUDA) with the same global batch: this "
         "command under torchrun (python -m torch.distributed.run).")]
SkipBadImages = Annotated[bool, typer.Option(
    "--skip-bad-images", metavar="",
    help="Go on without the images the scan finds bad (zero-byte, truncated, undecodable, "
         "over the pixel limit...; listed in reports/bad-images-<dataset>.txt) instead of "
         "stopping; recorded in the workdir, it holds while those files stay the same.")]
MaxImagePixels = Annotated[int | None, typer.Option(
    "--max-image-pixels", metavar="N",
    help="Refuse images of more than N pixels, read from the header before any decoding "
         "(default 89478485, PIL's limit).")]
DropEmptyClasses = Annotated[bool, typer.Option(
    "--drop-empty-classes", metavar="",
    help="Leave out class folders without images instead of refusing the dataset.")]


def _open(workdir, datasets, preset, teachers, input_size, seed, data_root, epochs, batch_size,
          lr, levels, holdout=None, trust_data=False):
    """Resolve the workspace and apply per-run overrides (not written back to the file).

    Nothing is written here: the caller validates the whole run first, then ``_session``
    creates the workspace and takes its lock."""
    from mlfd.config import DatasetEntry, Experiment, resolve_source, short_name
    from mlfd.data.registry import set_trust_data
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
            size = _default_size(arch)  # a timm architecture: no other suffix, no path
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
        workdir = _find_workdir(new)
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


def _set_cache_uri(ws, uri: str | None) -> None:
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


def _images(max_image_pixels: int | None, drop_empty_classes: bool) -> None:
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


def _find_workdir(new) -> Path:
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
    from mlfd.data.registry import list_datasets
    from mlfd.presets import PRESETS

    for d in datasets:
        if d == "all" or d in list_datasets() or Path(d).expanduser().exists():
            continue
        known = ", ".join(dict.fromkeys(n for make in PRESETS.values() for n in make().names()))
        raise MlfdError(f"unknown dataset {d!r}: no preset has it ({known}) and {workdir} "
                        "holds no experiment to look it up in; start one with --teacher "
                        "DATASET=ARCH (twice or more) or pass --workdir")


def _default_size(arch: str) -> int:
    from mlfd.models.backbone import timm

    if not timm.is_model(arch):
        raise MlfdError(f"unknown timm architecture {arch!r} (see timm.list_models())")
    return int(timm.get_pretrained_cfg(arch).input_size[-1]) if timm.get_pretrained_cfg(arch) \
        else 224


PIPELINES = ("auto", "dali", "torch")


LOGS = ("tensorboard",)


def _opts(device, pipeline="auto", loss_backend=None, force=False, restart=False, log=None):
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


def _check(ws, opts, levels=None) -> None:
    """Check what needs data and models; nothing is written."""
    from mlfd.config import check_model_kwargs
    from mlfd.stages.cache import check_levels
    from mlfd.stages.common import dataset_of

    for i, e in enumerate(ws.exp.datasets):
        dataset_of(ws, e.name)  # exists, readable, >= 2 classes
        _default_size(e.arch)  # a timm architecture
        check_model_kwargs(e, i)  # that its model takes
    if levels is not None:
        check_levels(ws, levels)
    if opts.loss_backend is None and levels is not None:
        from mlfd.losses import resolve_backend

        resolve_backend(ws.exp.distill.loss_backend, opts.device)
    from mlfd.fastpaths import check_explicit  # on CUDA: an explicit choice must have passed

    check_explicit(opts, ws.exp.distill.loss_backend if levels is not None else None)


@contextlib.contextmanager
def _session(ws, opts, levels=None):
    """Check the run, then create the workspace and hold its lock.

    Under torchrun rank 0 checks first (fetching any data), then the others; only rank 0
    locks and writes, and the lock is held until every rank is done."""
    from mlfd.engine.distributed import barrier, is_main

    if is_main():
        _check(ws, opts, levels)
    barrier()
    if not is_main():
        _check(ws, opts, levels)
    with ws.locked() if is_main() else contextlib.nullcontext(ws):
        if is_main():
            ws.create()
        barrier()  # experiment.yaml is written before any rank reads state
        yield ws
        barrier()


class _Exit(Exception):
    """Leave main() with this code, printing nothing more (an `--nproc` run's ranks did)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _distribute(nproc, ws, opts, levels, sections: tuple[str, ...], dry_run: bool) -> None:
    """Check --nproc and that the batches split over the processes, before anything is
    written; with N > 1 run the command in N processes and leave with their exit code."""
    from mlfd.engine.distributed import under_torchrun, world

    if nproc is not None and under_torchrun():
        raise MlfdError("--nproc starts torchrun itself: drop it inside torchrun")
    if nproc is not None and nproc < 1:
        raise MlfdError(f"--nproc must be >= 1, got {nproc}")
    n = nproc or world()
    _check_split(ws, sections, n, f"--nproc {n}" if nproc else f"{n} torchrun processes")
    if n == 1 or nproc is None or dry_run:
        return
    import torch

    if opts.device.type == "cuda" and nproc > torch.cuda.device_count():
        raise MlfdError(f"--nproc {nproc}: only {torch.cuda.device_count()} CUDA device(s) "
                        "here (one per process); use fewer or --device cpu")
    _check(ws, opts, levels)  # data and models: fail once, here, rather than in N processes
    raise _Exit(_relaunch(nproc, ws))


def _check_split(ws, sections: tuple[str, ...], n: int, how: str) -> None:
    """Each training section's micro-batch must split evenly over ``n`` processes: every
    rank takes an equal share of each global batch."""
    for section in sections:
        cfgs = [(section, ws.exp.stage(section, None))]
        if section in ("teach", "distill"):  # datasets may have their own values
            cfgs += [(f"datasets[{e.name}].{section}", ws.exp.stage(section, e.name))
                     for e in ws.exp.datasets if getattr(e, section)]
        for label, cfg in cfgs:
            if cfg.micro_batch % n:
                accum = f" in {cfg.grad_accum} micro-batches" if cfg.grad_accum > 1 else ""
                raise MlfdError(f"{how}: {label}.batch_size {cfg.batch_size}{accum} does not "
                                f"split over {n} processes; use a --batch-size divisible by "
                                f"{n * cfg.grad_accum}")


def _relaunch(nproc: int, ws) -> int:
    """This command (minus --nproc) in ``nproc`` processes under torch.distributed.run,
    launched in this process so that a failure ends as one line, not torchrun's report."""
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    from mlfd.engine.distributed import ERRORS_ENV

    args, value = [], False  # the command line without --nproc N / --nproc=N
    for a in sys.argv[1:]:
        if not value and a != "--nproc" and not a.startswith("--nproc="):
            args.append(a)
        value = a == "--nproc" and not value  # the next item is its value
    if not any(a in ("--workdir", "-w") or a.startswith("--workdir=") for a in args):
        args += ["--workdir", str(ws.root)]  # found once, here
    # torchrun's default is one thread per process, announced in a banner
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.disable(logging.CRITICAL)  # torchrun's agent logs its every move at WARNING
    with tempfile.TemporaryDirectory(prefix="mlfd-ranks-") as errors:
        os.environ[ERRORS_ENV] = errors
        try:
            torchrun(parse_args(["--standalone", f"--nproc-per-node={nproc}",
                                 "-m", "mlfd_cli.main", *args]))
            return 0
        except ChildFailedError as e:
            return _rank_failure(e, Path(errors), nproc)
        except SignalException as e:  # Ctrl-C or a kill: torchrun stopped the ranks
            if 0 not in _rank_errors(Path(errors), own=True):  # rank 0 did not say so itself
                print("interrupted: finished results are kept; run the same command again "
                      "to resume (--restart to start over)", file=sys.stderr)
            return 128 + int(e.sigval)
        finally:
            os.environ.pop(ERRORS_ENV, None)
            logging.disable(logging.NOTSET)


def _rank_failure(err, folder: Path, nproc: int) -> int:
    """The exit code of a failed `--nproc` run. Rank 0 printed its own error; otherwise
    the first rank with one of its own (not a broken connection to a failed peer) has it
    shown here; failing that, the way the first process ended."""
    import signal

    said = _rank_errors(folder, own=True)
    if said:
        first = min(said)
        if first != 0:
            print(said[first]["line"], file=sys.stderr)
        return int(said[first]["code"])
    rank, failure = err.get_first_failure()
    code = int(failure.exitcode)
    how = f"exit code {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            how = f"signal {signal.Signals(-code).name}"
    print(f"error: process {rank} of {nproc} ended with {how}", file=sys.stderr)
    return code if code > 0 else 128 - code


def _rank_errors(folder: Path, own: bool = False) -> dict[int, dict]:
    """rank -> {code, line, secondary} the failed ranks of an `--nproc` run left (``own``:
    only errors of their own, not a lost connection to a failed peer)."""
    said = {}
    for f in folder.glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            doc = json.loads(f.read_text())
            if not (own and doc.get("secondary")):
                said[int(doc["rank"])] = doc
    return said


def _say(line: str, code: int, secondary: bool = False) -> None:
    """Print an error line once per run. Under `--nproc` every failing rank leaves it for
    the launcher and only rank 0 prints (unless its error only echoes a failed peer);
    under a bare torchrun every rank prints, ranks other than 0 naming themselves."""
    from mlfd.engine import distributed as dist

    folder = os.environ.get(dist.ERRORS_ENV)
    if dist.world() > 1 and folder:
        with contextlib.suppress(OSError):
            Path(folder, f"rank-{dist.rank()}.json").write_text(json.dumps(
                {"rank": dist.rank(), "code": code, "line": line, "secondary": secondary}))
        if dist.rank() > 0 or secondary:
            return
    elif dist.rank() > 0:
        line = f"[rank {dist.rank()}] {line}"
    print(line, file=sys.stderr)


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

    from mlfd.engine.distributed import is_main
    from mlfd.report import rich_table

    if not is_main():  # under torchrun rank 0 speaks for the run
        return
    if rows is not None:
        Console(stderr=as_json).print(rich_table(rows))  # fits 80 columns
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
    from mlfd.data.download import no_fetch
    from mlfd.engine.distributed import is_main
    from mlfd.stages.plan import announce
    from mlfd.storage.staging import set_read_only

    set_read_only()  # no lock is held: leave any other run's files as they are
    if not is_main():  # under torchrun rank 0 prints the plan
        return
    with no_fetch():  # data that is not there is planned for, not downloaded
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
    from mlfd.engine.distributed import is_main
    from mlfd.report import write_reports
    from mlfd.stages import evaluate

    rows = evaluate(ws, opts)  # under torchrun: every rank, each its shard of the test sets
    return rows, write_reports(ws, rows) if is_main() else {}


@command()
def teach(workdir: Workdir = None, dataset: Datasets = None, device: Device = "auto",
          seed: Seed = None, data_root: DataRoot = None, trust_data: TrustData = False,
          json_out: Json = False,
          preset: Preset = None, teacher: Teacher = None, input_size: InputSize = None,
          epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None,
          pipeline: Pipeline = "auto", force: Force = False, restart: Restart = False,
          dry_run: DryRun = False, log_to: LogTo = None, nproc: Nproc = None,
          holdout: Holdout = None, precision: Precision = "auto",
          skip_bad_images: SkipBadImages = False, max_image_pixels: MaxImagePixels = None,
          drop_empty_classes: DropEmptyClasses = False,
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
    from mlfd.engine.distributed import is_main, on_main
    from mlfd.engine.progress import log
    from mlfd.fastpaths import check_precision
    from mlfd.stages import teach as run
    from mlfd.stages.baselines import KINDS, train_baseline
    from mlfd.stages.plan import plan_baseline, plan_teach
    from mlfd.stages.scan import scan

    opts = _opts(device, pipeline, force=force, restart=restart, log=log_to)
    opts.precision = check_precision(precision)
    _images(max_image_pixels, drop_empty_classes)
    ws = _open(workdir, dataset, preset, teacher, input_size, seed, data_root, epochs, batch_size,
               lr, None, holdout, trust_data)
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
    _distribute(nproc, ws, opts, None, ("teach",), dry_run)
    if dry_run and baseline:
        return _dry_run(ws, opts, None, json_out, plan_baseline, baseline, arch, input_size,
                        force, restart)
    if dry_run:
        return _dry_run(ws, opts, None, json_out, plan_teach, names, force, restart)
    with _session(ws, opts):
        if changed and is_main():
            ws.record_imports(changed)  # the experiment now names these checkpoints
        scan(ws, ws.exp.names() if baseline else names, skip_bad_images)  # before planning
        if baseline:  # under torchrun: rank 0 plans, every rank trains
            plan = on_main(plan_baseline, ws, baseline, arch, input_size, force, restart)
            res = {}
            for s in plan.reused:
                log(f"[teach] {s.target}: up to date (--force retrains)")
            for s in plan.steps:
                log(f"[teach] {s.target}: {s.reason}")
                res = train_baseline(ws, opts, baseline, arch, input_size)
            _emit(json_out, {"workdir": str(ws.root), "baseline": baseline, "metrics": res})
            return
        plan, results = on_main(plan_teach, ws, names, force, restart), {}
        for s in plan.reused:
            log(f"[teach] {s.target}: up to date (--force retrains)")
        for s in plan.steps:
            log(f"[teach] {s.target}: {s.reason}")
            results[s.target] = run(ws, opts, s.target)
    _emit(json_out, {"workdir": str(ws.root), "trained": results})


@command()
def cache(workdir: Workdir = None, levels: Levels = None, device: Device = "auto",
          seed: Seed = None, data_root: DataRoot = None, trust_data: TrustData = False,
          json_out: Json = False,
          preset: Preset = None, dataset: Datasets = None, pipeline: Pipeline = "auto",
          force: Force = False, restart: Restart = False, dry_run: DryRun = False,
          cache_uri: CacheUri = None, nproc: Nproc = None,
          skip_bad_images: SkipBadImages = False, max_image_pixels: MaxImagePixels = None,
          drop_empty_classes: DropEmptyClasses = False):
    """Cache teacher embeddings at L_K for all datasets; then joint targets if `fuse` ran.

    Missing, stale or corrupt groups are (re)written; an interrupted extraction resumes
    at its last complete shard.

    Example: mlfd cache --workdir mlfd-runs/demo --levels 2
    """
    from mlfd.engine.distributed import on_main
    from mlfd.stages import cache_targets, cache_teachers
    from mlfd.stages.fuse import joint_status
    from mlfd.stages.plan import plan_cache
    from mlfd.stages.scan import scan

    opts = _opts(device, pipeline, force=force, restart=restart)
    _images(max_image_pixels, drop_empty_classes)
    ws = _open(workdir, dataset, preset, None, None, seed, data_root, None, None, None, levels,
               trust_data=trust_data)
    _set_cache_uri(ws, cache_uri)
    k = _levels(ws, levels)
    _distribute(nproc, ws, opts, k, (), dry_run)
    if dry_run:
        return _dry_run(ws, opts, k, json_out, plan_cache, k, force)

    with _session(ws, opts, k):  # under torchrun every rank extracts its own rows
        scan(ws, ws.exp.names(), skip_bad_images)
        done = {"teachers": cache_teachers(ws, opts, k), "targets": []}
        if on_main(joint_status, ws, k).ok:  # rank 0 decides for all
            done["targets"] = cache_targets(ws, opts, k)
    _emit(json_out, {"workdir": str(ws.root), "levels": k, "written": done})


@command()
def fuse(workdir: Workdir = None, levels: Levels = None, device: Device = "auto",
         seed: Seed = None, data_root: DataRoot = None, trust_data: TrustData = False,
         json_out: Json = False,
         preset: Preset = None, epochs: Epochs = None, batch_size: BatchSize = None,
         lr: Lr = None, force: Force = False, restart: Restart = False,
         dry_run: DryRun = False, log_to: LogTo = None, cache_uri: CacheUri = None,
         nproc: Nproc = None, precision: Precision = "auto",
         skip_bad_images: SkipBadImages = False, max_image_pixels: MaxImagePixels = None,
         drop_empty_classes: DropEmptyClasses = False):
    """Train the joint teacher on the cached teacher embeddings of all datasets.

    An up-to-date joint teacher is kept (--force retrains); an interrupted run resumes.

    Example: mlfd fuse --workdir mlfd-runs/demo --levels 2 --epochs 10
    """
    from mlfd.engine.distributed import on_main
    from mlfd.engine.progress import log
    from mlfd.fastpaths import check_precision
    from mlfd.stages import fuse as run
    from mlfd.stages.fuse import joint_status
    from mlfd.stages.plan import plan_fuse
    from mlfd.stages.scan import scan

    opts = _opts(device, force=force, restart=restart, log=log_to)
    _images(max_image_pixels, drop_empty_classes)
    opts.precision = check_precision(precision)
    ws = _open(workdir, None, preset, None, None, seed, data_root, epochs, batch_size, lr, levels,
               trust_data=trust_data)
    _set_cache_uri(ws, cache_uri)
    k = _levels(ws, levels)
    _distribute(nproc, ws, opts, k, ("fuse",), dry_run)
    if dry_run:
        return _dry_run(ws, opts, k, json_out, plan_fuse, k, force, restart)
    with _session(ws, opts, k):
        scan(ws, ws.exp.names(), skip_bad_images)  # the teachers' data, as they saw it
        st = on_main(joint_status, ws, k)  # under torchrun rank 0 decides for all
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
            trust_data: TrustData = False,
            json_out: Json = False, preset: Preset = None, teacher: Teacher = None,
            input_size: InputSize = None, epochs: Epochs = None, batch_size: BatchSize = None,
            lr: Lr = None, pipeline: Pipeline = "auto", loss_backend: LossBackend = None,
            force: Force = False, restart: Restart = False, dry_run: DryRun = False,
            log_to: LogTo = None, cache_uri: CacheUri = None, nproc: Nproc = None,
            holdout: Holdout = None, cache_memory: Annotated[str | None, typer.Option(
                "--cache-memory", metavar="SIZE",
                help="Memory for the joint targets, e.g. 4GiB, 512MiB, 1.5G, per process "
                     "(default: half the free memory, GPU memory too on CUDA, divided among "
                     "the processes on the machine under --nproc/torchrun: each holds its "
                     "own copy). Bigger target caches are streamed in chunk-shuffled "
                     "windows, which the student's fingerprint records.")] = None,
            precision: Precision = "auto", skip_bad_images: SkipBadImages = False,
            max_image_pixels: MaxImagePixels = None,
            drop_empty_classes: DropEmptyClasses = False):
    """Distil students; first runs (and announces) any missing or stale teach/cache/fuse step.

    Up-to-date results are reused; the plan says why each step runs. Interrupted
    training resumes from its last finished epoch (--restart starts over). Image
    datasets are scanned first, as `mlfd check` does.

    Examples:\n
      mlfd distill --dataset fashion-mnist-mini --levels 2\n
      mlfd distill --dataset all --levels 1 --workdir mlfd-runs/demo\n
      mlfd distill --teacher data/a.npz=resnet18 --teacher data/b=efficientnet_b0 --dataset a
    """
    from mlfd.cache.stream import parse_size
    from mlfd.fastpaths import check_precision
    from mlfd.stages import plan_distill, run_distill
    from mlfd.stages.distill import cache_budget

    opts = _opts(device, pipeline, loss_backend, force, restart, log_to)
    opts.precision = check_precision(precision)
    _images(max_image_pixels, drop_empty_classes)
    if cache_memory is not None:
        opts.cache_memory = parse_size(cache_memory)
    ws = _open(workdir, dataset, preset, teacher, input_size, seed, data_root, epochs, batch_size,
               lr, levels, holdout, trust_data)
    _set_cache_uri(ws, cache_uri)
    k = _levels(ws, levels)
    names = _names(ws, dataset)
    _distribute(nproc, ws, opts, k, ("teach", "fuse", "distill"), dry_run)
    if dry_run:
        return _dry_run(ws, opts, k, json_out, plan_distill, names, k, force, restart,
                        cache_budget(opts, nproc))  # the budget each of nproc would have
    with _session(ws, opts, k):
        steps = run_distill(ws, opts, names, k, skip_bad_images)
        rows, reports = _report(ws, opts)
    _emit(json_out, {"workdir": str(ws.root), "levels": k,
                     "steps": [vars(s) for s in steps], "rows": rows, "reports": reports}, rows)


@command("eval")
def eval_(workdir: Workdir = None, device: Device = "auto", data_root: DataRoot = None,
          trust_data: TrustData = False,
          json_out: Json = False, pipeline: Pipeline = "auto", cache_uri: CacheUri = None,
          skip_bad_images: SkipBadImages = False, max_image_pixels: MaxImagePixels = None,
          drop_empty_classes: DropEmptyClasses = False):
    """Top-1/top-5 of every complete model and the paper-style comparison table.

    Incomplete, corrupt or stale results are listed with their status, never as results.

    Example: mlfd eval --workdir mlfd-runs/demo --json
    """
    from mlfd.stages.scan import scan
    from mlfd.storage.staging import set_read_only

    opts = _opts(device, pipeline)
    _images(max_image_pixels, drop_empty_classes)
    ws = _open(workdir, None, None, None, None, None, data_root, None, None, None, None,
               trust_data=trust_data)
    _set_cache_uri(ws, cache_uri)
    set_read_only()  # eval takes no lock: it must not touch a running stage's files
    scan(ws, ws.exp.names(), skip_bad_images)  # the test images, as the models were made
    rows, reports = _report(ws, opts)
    _emit(json_out, {"workdir": str(ws.root), "rows": rows, "reports": reports}, rows)


@command()
def check(workdir: Workdir = None, dataset: Datasets = None, data_root: DataRoot = None,
          trust_data: TrustData = False, json_out: Json = False, preset: Preset = None,
          teacher: Teacher = None, skip_bad_images: SkipBadImages = False,
          max_image_pixels: MaxImagePixels = None,
          drop_empty_classes: DropEmptyClasses = False):
    """Scan the datasets' images: the check every run starts with, alone.

    Every image of every split is decoded once (in threads, with a progress bar)
    and every bad file is reported at once: zero-byte, truncated, undecodable,
    of a pixel mode the pipelines do not read alike, of an unexpected size, or
    over the pixel limit (read from the header, never decoded). Hidden files
    (.DS_Store, macOS ._name.png) and other extensions are not images of the
    dataset and are left aside; an empty class folder is an error. Bad files
    stop with exit 2 (listed in reports/bad-images-<dataset>.txt) unless
    --skip-bad-images. The result is kept in the workdir: the next run does not
    decode the same files again. Datasets held in memory (npz, MNIST, the demo
    sets) have no files to scan.

    Example: mlfd check --teacher data/digits=resnet18 --teacher data/letters=resnet18
    """
    from mlfd.stages.common import dataset_of
    from mlfd.stages.scan import scan

    opts = _opts("cpu")
    _images(max_image_pixels, drop_empty_classes)
    ws = _open(workdir, dataset, preset, teacher, None, None, data_root, None, None, None, None,
               trust_data=trust_data)
    names = _names(ws, dataset)
    with _session(ws, opts):
        found = {r.name: r for r in scan(ws, names, skip_bad_images)}
    docs = []
    for n in names:
        r = found.get(n)
        if r is None:
            ds = dataset_of(ws, n)
            docs.append({"dataset": n, "images": sum(len(ds.load(s)) for s in ds.splits()),
                         "files": False, "bad": [], "skipped": False})
            line = f"{n}: images held in memory, no files to scan"
        else:
            docs.append({"dataset": n, "images": r.images, "files": True, "skipped": r.skipped,
                         "bad": [vars(b) for b in r.bad], "list": r.listing})
            line = f"{n}: {r.images} images" + (
                f", {len(r.bad)} bad left out (listed in {r.listing})" if r.bad else ", all good")
        print(line, file=sys.stderr if json_out else sys.stdout)
    if json_out:
        sys.stdout.write(json.dumps({"workdir": str(ws.root), "datasets": docs}) + "\n")


@command()
def export(out: Annotated[Path, typer.Argument(
               metavar="OUT", help="Folder to write model.safetensors and config.json into.",
               show_default=False)],
           workdir: Workdir = None, dataset: Datasets = None, levels: Annotated[
               int | None, typer.Option("--levels", "-k", metavar="K",
                                        help="The student distilled at L1..LK (default: the "
                                             "highest complete one).")] = None,
           data_root: DataRoot = None, trust_data: TrustData = False, json_out: Json = False,
           force: Annotated[bool, typer.Option(
               "--force", metavar="", help="Export a stale or incomplete student too.")] = False):
    """Export a student as timm weights with a timm/Hugging Face config.json.

    OUT/model.safetensors is the student's timm state dict; OUT/config.json
    gives its architecture, class names, model_args and preprocessing, so
    plain timm loads it: timm.create_model("local-dir:OUT", pretrained=True).
    Only complete students are exported unless --force.

    Example: mlfd export --workdir mlfd-runs/demo --dataset mnist-mini out/mnist
    """
    from mlfd.engine.progress import log
    from mlfd.stages.export import export_student
    from mlfd.storage.staging import set_read_only

    if not dataset or len(dataset) != 1 or dataset[0] == "all":
        raise MlfdError("export takes exactly one --dataset NAME")
    ws = _open(workdir, dataset, None, None, None, None, data_root, None, None, None, None,
               trust_data=trust_data)
    set_read_only()  # no lock is taken: the workdir is only read
    doc = export_student(ws, dataset[0], out, levels, force)
    line = (f"exported {doc['dataset']} L{doc['levels']} student ({doc['status']}) "
            f"to {out}: model.safetensors, config.json")
    if json_out:
        log(line)
        sys.stdout.write(json.dumps(dict(doc, workdir=str(ws.root))) + "\n")
    else:
        print(line)


STATE_WORDS = {"ok": "complete"}


def _stage_rows(ws) -> list[dict]:
    """Status of every stage's results, read-only: teachers, joint L*, students, baselines."""
    from mlfd.engine.artifact import Artifact
    from mlfd.engine.checkpoint import load_meta_safe
    from mlfd.stages.baselines import baseline_fingerprint
    from mlfd.stages.distill import student_fingerprint
    from mlfd.stages.evaluate import trained_levels
    from mlfd.stages.fuse import joint_fingerprint
    from mlfd.stages.scan import recorded
    from mlfd.stages.teach import teacher_fingerprint

    for name in ws.exp.names():  # a run's accepted skip of bad images is part of its data
        with contextlib.suppress(MlfdError):
            recorded(ws, name)

    def row(stage, target, art, fingerprint):
        try:
            st = art.status(fingerprint())
            note = ""
        except MlfdError as e:  # e.g. data not at hand: staleness cannot be checked
            st = art.status(None)
            note = f" (not checked for staleness: {e})"
        state = STATE_WORDS.get(st.state, st.state)
        reason = st.reason
        partial = art.partial()
        if st.state == "missing" and partial is not None:
            state = "incomplete"
            reason = (f"run in progress or interrupted at epoch {partial.get('epoch')}/"
                      f"{partial.get('epochs')}")
        return {"stage": stage, "target": target, "status": state, "reason": reason + note}

    rows = []
    for e in ws.exp.datasets:
        rows.append(row("teach", e.name, Artifact(ws.teacher_dir(e.name)),
                        lambda e=e: teacher_fingerprint(ws, e.name)))
    for k in trained_levels(ws, "joint") or [ws.exp.levels]:
        rows.append(row("fuse", f"joint L{k}", Artifact(ws.joint_dir(k)),
                        lambda k=k: joint_fingerprint(ws, k)))
    for e in ws.exp.datasets:
        for k in trained_levels(ws, "student", e.name) or [ws.exp.levels]:
            rows.append(row("distill", f"{e.name} L{k}", Artifact(ws.student_dir(e.name, k)),
                            lambda e=e, k=k: student_fingerprint(ws, e.name, k)))
    base = ws.root / "baselines"
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if base.is_dir() else []:
        art = Artifact(d)
        meta = load_meta_safe(d / "last") or {}
        if {"baseline", "arch", "input_size"} <= set(meta):
            fp = lambda m=meta: baseline_fingerprint(ws, m["baseline"], m["arch"],  # noqa: E731
                                                     m["input_size"])
        else:
            fp = lambda: None  # noqa: E731
        rows.append(row("baseline", d.name, art, fp))
    return rows


@command("list")
def list_(root: Annotated[Path, typer.Option(
              "--root", metavar="DIR", help="Where to look for experiments.")] = Path("mlfd-runs"),
          data_root: DataRoot = None, json_out: Json = False):
    """Each experiment under --root and the status of its results (read-only).

    Per stage: complete, stale (made from other inputs than the experiment
    now asks for), incomplete (interrupted or running), corrupt or missing.

    Example: mlfd list --root mlfd-runs --json
    """
    from mlfd.storage.staging import set_read_only
    from mlfd.workspace import Workspace, find_experiments

    set_read_only()  # no lock is taken: leave any running stage's files as they are
    experiments, table = [], []
    for w in find_experiments(root):
        doc = {"workdir": str(w)}
        try:
            ws = Workspace.open(w, data_root=data_root)
            doc.update(preset=ws.exp.preset, datasets=ws.exp.names(), stages=_stage_rows(ws))
        except MlfdError as e:
            doc.update(error=str(e), stages=[])
            table.append({"experiment": w.name, "stage": "-", "target": "-", "status": "error",
                          "reason": str(e)})
        table += [dict(experiment=w.name, **r) for r in doc["stages"]]
        experiments.append(doc)
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=json_out)
    if not console.is_terminal:
        console.width = max(console.width, 110)
    if not experiments:
        console.print(f"no experiments under {root}/")
    else:
        t = Table(title=f"mlfd experiments under {root}/")
        for col in ("experiment", "stage", "target", "status", "reason"):
            t.add_column(col)
        for r in table:
            t.add_row(*(str(r[c]) for c in ("experiment", "stage", "target", "status", "reason")))
        console.print(t)
    if json_out:
        sys.stdout.write(json.dumps({"root": str(root), "experiments": experiments}) + "\n")


REBUILT = ("teachers", "joint", "students", "baselines", "reports", "cache")


STAGED_IN = ("teachers", "joint", "students", "baselines")  # where training runs are staged
STORE_KINDS = {"teachers": "teacher-embeddings", "targets": "joint-targets"}  # <name>-L<K>.zarr
REPORT_FILES = ("results.json", "results.md", "curves-*.png")


def _store_judge(ws, name: str):
    """judge(group, fingerprint) for ``store.foreign``: why a group of the cache store
    ``name`` is not this experiment's (None: it is); None for a name mlfd never gives."""
    import re

    m = re.fullmatch(r"\.?(teachers|targets)-L([1-9][0-9]*)\.zarr(?:\.partial)?", name)
    if m is None:
        return None
    names = set(ws.exp.names())

    def judge(group: str, fp: dict) -> str | None:
        dataset, split = group.split("/")
        split = re.sub(r"^\.(.+)\.(?:partial|old)$", r"\1", split)  # a staged group
        want = (STORE_KINDS[m[1]], int(m[2]), dataset, split)
        if dataset not in names or (fp.get("kind"), fp.get("level"), fp.get("dataset"),
                                    fp.get("split")) != want:
            return f"not the {m[1]} cache of this experiment"
        return None

    return judge


Found = list[tuple[str, int, Callable[[], None]]]  # (path, bytes, remove) of what clean removes


def _cache_stores(ws, location) -> tuple[Found, list[tuple[str, str]]]:
    """([(path, bytes, remove)] of this experiment's cache stores under ``location``,
    [(path, why)] of the other ``*.zarr`` there): a shared directory keeps the others."""
    from mlfd.cache.store import foreign, stores_under

    mine, others = [], []
    for p, d in stores_under(location):
        judge = _store_judge(ws, p.rstrip("/").rsplit("/", 1)[-1])
        why = "not a name mlfd gives a cache store" if judge is None else foreign(d, judge)
        if why:
            others.append((p, why))
        else:
            mine.append((p, d.nbytes(), d.remove))
    return mine, others


def _mlfd_result(d: Path) -> bool:
    """A trained result's directory: its checkpoint metadata says mlfd wrote it."""
    for name in ("last.json", "best.json"):
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((d / name).read_text())
            if isinstance(meta, dict) and "mlfd_version" in meta and "fingerprint" in meta:
                return True
    return False


def _made_by_mlfd(p: Path, top: str) -> bool:
    """Whether mlfd made ``p``, in (or below) its layout directory ``top``: a staged run,
    a trained result, a report file."""
    from fnmatch import fnmatch

    if p.is_symlink():
        return False
    if p.is_dir():
        staged = p.name.startswith(".") and p.name.endswith((".partial", ".old"))
        return top in STAGED_IN and (staged or _mlfd_result(p))
    return top == "reports" and any(fnmatch(p.name, f) for f in REPORT_FILES)


def _sweep(d: Path, top: str) -> tuple[list[Path], list[Path]] | None:
    """(what mlfd made under directory ``d``, the rest); None when mlfd made all of it
    (an empty directory too): then ``d`` goes whole."""
    mine, others = [], []
    for p in sorted(d.iterdir()):
        if _made_by_mlfd(p, top):
            mine.append(p)
        elif p.is_dir() and not p.is_symlink():
            inside = _sweep(p, top)
            if inside is None:
                mine.append(p)
            else:
                mine += inside[0]
                others += inside[1]
        else:
            others.append(p)
    return None if not others else (mine, others)


def _clean_targets(ws, everything: bool) -> tuple[Found, list[tuple[str, str]]]:
    """What `clean` removes, [(path, bytes, remove)]: this experiment's cache stores and
    staged runs; with ``everything`` all results too. And what it leaves alone although it
    lies where those do, [(path, why)]: mlfd deletes only what it made (design §13)."""
    root, found, kept = ws.root, [], []

    def take(p: Path) -> None:
        found.append((str(p), _size(p), partial(_remove, p)))

    locations, elsewhere = [root / "cache"], ws.cache_root()
    if ws.exp.cache.uri and not (isinstance(elsewhere, Path)
                                 and elsewhere.resolve() == (root / "cache").resolve()):
        locations.append(elsewhere)  # caches kept elsewhere (cache.uri) are this workdir's too
    for i, location in enumerate(locations):
        if isinstance(location, Path) and (not location.is_dir() or location.is_symlink()):
            continue
        mine, others = _cache_stores(ws, location)
        if i == 0 and everything:  # <workdir>/cache itself: whole if all in it is mlfd's
            seen = {p for p, *_ in mine} | {p for p, _ in others}
            others += [(str(p), "not made by mlfd") for p in sorted(location.iterdir())
                       if str(p) not in seen]
            if not others:
                take(location)
                continue
        found += mine
        kept += others
    if everything:
        for top in REBUILT:
            d = root / top
            if top == "cache" or not d.is_dir() or d.is_symlink():
                continue
            inside = _sweep(d, top)
            if inside is None:
                take(d)
            else:
                for p in inside[0]:
                    take(p)
                kept += [(str(p), "not made by mlfd") for p in inside[1]]
        return found, kept
    for top in STAGED_IN:  # staged (interrupted) training runs
        for d, dirs, _ in os.walk(root / top):
            for name in list(dirs):
                if name.startswith(".") and name.endswith(".partial"):
                    take(Path(d) / name)
                    dirs.remove(name)
    return found, kept


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum((Path(d) / f).lstat().st_size for d, _, files in os.walk(path) for f in files)


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


@command()
def clean(workdir: Workdir = None,
          caches: Annotated[bool, typer.Option(
              "--caches", metavar="", help="Remove this experiment's cache stores (cache/*.zarr, "
                                           "and those under cache.uri) and staged runs "
                                           "(.*.partial): trained results stay.")] = False,
          everything: Annotated[bool, typer.Option(
              "--all", metavar="", help="Also remove every trained result and report; "
                                        "experiment.yaml stays.")] = False,
          dry_run: Annotated[bool, typer.Option(
              "--dry-run", "-n", metavar="", help="Print what would be removed; remove nothing.")]
          = False,
          json_out: Json = False):
    """Remove what can be rebuilt, and say how many bytes that freed.

    --caches: embedding caches and interrupted (staged) runs. --all: also
    teachers, joint teachers, students, baselines and reports; only
    experiment.yaml stays. Only what mlfd made goes: a store under cache.uri
    that is not this experiment's, or a file mlfd did not write, is left alone
    (and listed). Takes the workdir's lock.

    Example: mlfd clean --workdir mlfd-runs/demo --caches
    """
    from mlfd.storage.staging import set_read_only
    from mlfd.workspace import EXPERIMENT_FILE, Workspace

    if not (caches or everything):
        raise MlfdError("clean needs --caches (caches and staged runs) or --all (everything "
                        "but experiment.yaml)")
    root = Path(workdir) if workdir is not None else _find_workdir(None)
    if not (root / EXPERIMENT_FILE).is_file():  # only an experiment's workdir is cleaned
        raise MlfdError(f"{root} holds no {EXPERIMENT_FILE}: not an mlfd workdir, nothing "
                        "removed")
    ws = Workspace.open(root)

    def shown(p: str):
        return Path(p).relative_to(ws.root) if Path(p).is_relative_to(ws.root) else p

    def report(sizes: list[tuple[str, int]], kept: list[tuple[str, str]]) -> None:
        total = sum(n for _, n in sizes)
        write = partial(print, file=sys.stderr if json_out else sys.stdout)
        verb = "would remove" if dry_run else "removed"
        for p, n in sizes:
            write(f"{verb} {shown(p)} ({_human(n)})")
        for p, why in kept:  # on stderr: a warning, not a result
            print(f"left alone {shown(p)}: {why}", file=sys.stderr)
        write(f"{verb} {len(sizes)} path(s), {total} bytes ({_human(total)}) from {ws.root}"
              + (f" and {ws.exp.cache.uri}" if ws.exp.cache.uri else "")
              + ("; dry run: nothing was removed" if dry_run else ""))
        if json_out:
            sys.stdout.write(json.dumps({
                "workdir": str(ws.root), "dry_run": dry_run, "bytes": total,
                "removed": [{"path": p, "bytes": n} for p, n in sizes],
                "left_alone": [{"path": p, "reason": why} for p, why in kept]}) + "\n")

    if dry_run:
        set_read_only()  # no lock is taken: nothing is touched
        found, kept = _clean_targets(ws, everything)
        return report([(p, n) for p, n, _ in found], kept)
    with ws.locked():
        sizes = []
        found, kept = _clean_targets(ws, everything)
        for p, n, remove in found:
            remove()
            sizes.append((p, n))
    report(sizes, kept)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


@command()
def info(json_out: Json = False,
         check: Annotated[bool, typer.Option(
             "--check", metavar="",
             help="Check every fast path against its reference (Triton kernel, torch.compile, "
                  "DALI GPU decoding, DALI vs driver, bf16/fp16) and show one row each; "
                  "cached per environment, so it runs once.")] = False,
         refresh: Annotated[bool, typer.Option(
             "--refresh", metavar="", help="With --check: run it again, ignoring the cache.")]
         = False):
    """Versions, the DALI build against the driver, and what `auto` uses (fast paths).

    Examples:\n
      mlfd info\n
      mlfd info --check --json
    """
    from mlfd.info import collect

    doc = collect(check=check or refresh, refresh=refresh)
    if json_out:
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="mlfd info", show_header=False)
    for k, v in doc.items():
        if k != "check":
            t.add_row(k, str(v))
    Console().print(t)
    if "check" in doc:
        rep = doc["check"]
        c = Table(title="fast paths" + (f" (cached {rep['created']})" if rep["cached"] else ""))
        for col in ("path", "status", "detail"):
            c.add_column(col)
        style = {"ok": "green", "failed": "red", "unavailable": "yellow"}
        for r in rep["rows"]:
            detail = r["detail"] + (f"; fix: {r['fix']}" if r.get("fix") else "")
            c.add_row(r["name"], f"[{style[r['status']]}]{r['status']}[/]", detail)
        Console().print(c)


def main() -> None:
    """Exit codes: 0 ok, 1 internal error (a bug), 2 bad input or state, 3 filesystem,
    4 workdir in use by another run, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

    Under torchrun (or --nproc) every process runs this; see mlfd.engine.distributed."""
    from mlfd.engine import distributed
    from mlfd.engine.metrics import set_tensorboard
    from mlfd.storage.staging import Sigterm, set_read_only

    usage_errors, no_args, aborts = _click_exceptions()
    sigterm = Sigterm()  # preemption stops a run as Ctrl-C does; restored below
    # per command (tests run many in one process); under torchrun only rank 0 may finish
    # another run's promotion, as only it writes
    set_read_only(not distributed.is_main())
    set_tensorboard(False)
    try:
        if distributed.world() > 1:
            verb = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
            if verb in ("list", "export", "clean", "info"):
                raise MlfdError(f"mlfd {verb} runs in one process: start it without torchrun")
        distributed.init()
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into Exit(130)
            raise KeyboardInterrupt
        distributed.shutdown()
        sys.exit(code if isinstance(code, int) else 0)
    except _Exit as e:
        sys.exit(e.code)
    except no_args as e:  # the rich help is printed while the error is made; plain is not
        if e.format_message():
            print(e.format_message())
        sys.exit(0)
    except usage_errors as e:  # usage errors: one line, like every other error
        _say(f"error: {e.format_message()}", 2)
        sys.exit(2)
    except MlfdError as e:
        _say(f"error: {e}", e.exit_code)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, *aborts):
        from mlfd.storage.staging import interrupt_note

        note = interrupt_note()
        code = 143 if sigterm.terminated else 130
        # under torchrun a SIGTERM may be the launcher stopping the ranks after another one
        # failed: that rank's error is the one to show
        _say("interrupted: finished results are kept" + (f"; {note}" if note else ""), code,
             secondary=sigterm.terminated and distributed.world() > 1)
        sys.exit(code)
    except OSError as e:
        _say(f"error: {_os_error(e)}", 3)
        sys.exit(3)
    except Exception as e:  # a bug, not bad input: one line unless asked for the traceback
        if _lost_peer(e):
            _say(f"error: another process of this torchrun run failed ({_first_line(e)})", 1,
                 secondary=True)
            sys.exit(1)
        if os.environ.get("MLFD_DEBUG"):
            raise
        _say(f"internal error: {e.__class__.__name__}: {e} (set MLFD_DEBUG=1 for a traceback)",
             1)
        sys.exit(1)
    finally:
        sigterm.restore()


def _lost_peer(e: Exception) -> bool:
    """A collective that failed because another rank died: an echo of that rank's error."""
    import torch.distributed as dist

    from mlfd.engine.distributed import world

    return world() > 1 and (isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and "by peer" in str(e)))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0]


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
    from mlfd.storage.diskio import describe

    return describe(e)


if __name__ == "__main__":
    main()
