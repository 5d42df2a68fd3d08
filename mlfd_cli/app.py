"""The Typer app, how its help is laid out, and the option types the verbs share."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup


class _HelpFlag:
    """-h/--help as a bare flag: newer typer shows a Python type ('<bool>') beside it."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


# The verbs in --help: the pipeline's order, then the rest. The modules that define them
# register them in another order (check lives with the training verbs).
VERBS = ("teach", "cache", "fuse", "distill", "eval", "compare", "check", "export", "predict",
         "list", "clean", "info")


class _Group(_HelpFlag, TyperGroup):
    def list_commands(self, ctx):
        names = super().list_commands(ctx)  # registration order; a verb not listed goes last
        return sorted(names, key=lambda n: VERBS.index(n) if n in VERBS else len(VERBS))


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
