"""The verb `compare`: the paper's comparison over seeds, on the current experiment."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlfd_cli import session
from mlfd_cli.app import (
    BatchSize,
    DataRoot,
    Datasets,
    Device,
    Epochs,
    Force,
    Holdout,
    InputSize,
    Json,
    Lr,
    Pipeline,
    Precision,
    Preset,
    Restart,
    SkipBadImages,
    Teacher,
    TrustData,
    Workdir,
    _Command,
    command,
)

GREEDY = ("--seeds", "--levels")


def _cpu_name() -> str | None:
    """The CPU's model name (Linux), to name the machine a table was measured on."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), None)


class _ListCommand(_Command):
    """``--seeds 0 1 2 --levels 1 2``: the values after a list option, up to the next
    option, are all its own (click takes one value per occurrence)."""

    def parse_args(self, ctx, args):
        out, current = [], None
        for a in args:
            if a in GREEDY:
                current = a
                continue
            if current and not a.startswith("-"):
                out += [current, a]
                continue
            current = None
            out.append(a)
        return super().parse_args(ctx, out)


@command("compare", cls=_ListCommand)
def compare(seeds: Annotated[list[int], typer.Option(
                "--seeds", metavar="SEED...", help="Seeds to run (e.g. --seeds 0 1 2); each in "
                                                   "<workdir>/compare/seed-N.")] = None,
            levels: Annotated[list[int], typer.Option(
                "--levels", "-k", metavar="K...", help="Student levels (e.g. --levels 1 2; "
                                                       "default: the experiment's).")] = None,
            baselines: Annotated[str, typer.Option(
                "--baselines", metavar="WHICH",
                help="same-arch: each dataset beside the multi-head and joint-head baselines "
                     "of its own architecture | all: beside every baseline | none.")]
            = "same-arch",
            budget: Annotated[str | None, typer.Option(
                "--budget", metavar="RULE",
                help="fixed | equal-images: how long teachers and students train, for this "
                     "run (default: the experiment's; see README, Budgets).")] = None,
            settings: Annotated[list[str] | None, typer.Option(
                "--set", metavar="KEY=VALUE",
                help="Change the experiment for this run (repeatable): a dotted key of "
                     "experiment.yaml, e.g. distill.epochs=4 or datasets.NAME.teach.epochs=12; "
                     "VALUE is JSON or YAML. Like --epochs, written only into a new "
                     "workdir's file.")] = None,
            workdir: Workdir = None, dataset: Datasets = None, preset: Preset = None,
            teacher: Teacher = None, device: Device = "auto", data_root: DataRoot = None,
            trust_data: TrustData = False, json_out: Json = False,
            input_size: InputSize = None, epochs: Epochs = None, batch_size: BatchSize = None,
            lr: Lr = None, holdout: Holdout = None, pipeline: Pipeline = "auto",
            precision: Precision = "auto", force: Force = False, restart: Restart = False,
            skip_bad_images: SkipBadImages = False):
    """Teachers, joint teachers, students and baselines over seeds: mean ± sample std.

    Each seed runs in its own workdir under the experiment's (compare/seed-N), reusing
    what is finished there, so an interrupted comparison resumes. Writes
    reports/compare.{md,json,png} in the experiment's workdir and says which differences
    exceed the spread over seeds.

    Example: mlfd compare --workdir mlfd-runs/demo --seeds 0 1 2 --levels 1 2
    """
    import os
    import platform

    from mlfd.engine.progress import log
    from mlfd.fastpaths import check_precision
    from mlfd.report import compare_table, write_compare
    from mlfd.stages.compare import BASELINES, apply_settings
    from mlfd.stages.compare import compare as run

    if baselines not in BASELINES:
        from mlfd.errors import MlfdError

        raise MlfdError(f"--baselines {baselines!r}: choose {', '.join(BASELINES)}")
    opts = session.opts(device, pipeline, force=force, restart=restart)
    opts.precision = check_precision(precision)
    ws = session.open_workdir(workdir, dataset, preset, teacher, input_size, None, data_root,
                              epochs, batch_size, lr, max(levels) if levels else None, holdout,
                              trust_data)
    if budget is not None:  # this run's rule, as --epochs is this run's epochs
        ws.exp.budget = budget
        ws.exp.validate()
    ws.exp = apply_settings(ws.exp, settings or [])  # after --epochs & co: the finer value wins
    ks = sorted(set(levels or [session.levels(ws, None)]))
    for k in ks:
        session.levels(ws, k)
    seeds = list(seeds or [ws.exp.seed])
    session.check(ws, opts, max(ks))
    with ws.locked():  # the experiment's own workdir: its file, and compare/ beneath it
        ws.create()
    per_seed = run(ws, opts, seeds, ks, baselines, skip_bad_images)
    machine = f"{_cpu_name() or platform.machine()}, {os.cpu_count()} cores, device {opts.device}"
    doc = write_compare(ws.reports, per_seed, ws.exp.names(), ks, baselines, machine)
    from rich.console import Console

    Console(stderr=json_out).print(compare_table(doc["aggregate"], seeds,
                                                 f"mlfd compare ({doc['split']})"))
    for line in doc["verdicts"] + doc["notes"]:
        print(line, file=sys.stderr if json_out else sys.stdout)
    log(f"[compare] wrote {', '.join(doc['reports'].values())}")
    if json_out:
        sys.stdout.write(json.dumps({"workdir": str(ws.root), **doc}, default=str) + "\n")
