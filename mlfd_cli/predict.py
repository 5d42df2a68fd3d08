"""The verb that runs a student on image files: predict."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from mlfd.errors import MlfdError
from mlfd_cli import session
from mlfd_cli.app import (
    DataRoot,
    Device,
    MaxImagePixels,
    TrustData,
    Workdir,
    command,
)
from mlfd_cli.errors import Exit

# What a process killed by SIGPIPE reports (128 + 13), as `cat big | head` does: the reader
# went away, so the output was cut short; nothing is printed about it.
CLOSED_PIPE = 141


def _paths(args: list[str]) -> Iterator[str]:
    """The PATH arguments in order, ``-`` standing for the lines of stdin (read lazily)."""
    for a in args:
        if a != "-":
            yield a
            continue
        for line in sys.stdin:
            line = line.rstrip("\r\n")
            if line:
                yield line


def _closed_pipe() -> None:
    """stdout's reader is gone: point stdout at /dev/null so the interpreter's final flush
    raises nothing either, and leave quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file descriptor (captured in-process)
        pass
    finally:
        os.close(devnull)
    raise Exit(CLOSED_PIPE)


@command()
def predict(
        paths: Annotated[list[str] | None, typer.Argument(
            metavar="PATH", show_default=False,
            help="Image files; '-' reads paths from stdin, one per line.")] = None,
        workdir: Workdir = None,
        dataset: Annotated[str | None, typer.Option(
            "--dataset", "-d", metavar="NAME", help="Whose student to run (with the workdir).")
        ] = None,
        model: Annotated[Path | None, typer.Option(
            "--model", metavar="DIR",
            help="A folder `mlfd export` wrote (model.safetensors, config.json) instead of "
                 "a workdir's student.")] = None,
        levels: Annotated[int | None, typer.Option(
            "--levels", "-k", metavar="K",
            help="The student distilled at L1..LK (default: the highest complete one).")
        ] = None,
        topk: Annotated[int, typer.Option(
            "--topk", metavar="K", help="Print the K most likely classes (label, prob each).")
        ] = 1,
        json_out: Annotated[bool, typer.Option(
            "--json", metavar="", help="JSON Lines: one object per image.")] = False,
        batch_size: Annotated[int, typer.Option(
            "--batch-size", metavar="N", help="Images per forward pass.")] = 64,
        device: Device = "auto", data_root: DataRoot = None, trust_data: TrustData = False,
        max_image_pixels: MaxImagePixels = None,
        force: Annotated[bool, typer.Option(
            "--force", metavar="", help="Use a stale or incomplete student too.")] = False,
        amalgamated: Annotated[bool, typer.Option(
            "--amalgamated", metavar="",
            help="Run the workdir's amalgamated student (mlfd distill --amalgamate), its "
                 "--dataset head.")] = False):
    """Classify image files with a student: one line per image on stdout.

    A line is PATH<TAB>LABEL<TAB>PROB (top-1, 4 decimals); --topk K adds a
    LABEL<TAB>PROB pair per class. --json prints JSON Lines instead:
    {"path", "label", "prob", "topk": [{"label", "index", "prob"}, ...]}.
    Images are read and resized as `mlfd eval` reads them.

    An unreadable file gets one `error: PATH: WHY` line on stderr; the
    others go on, and the exit code is 2 when any failed. Output is flushed
    per batch; when the reader closes the pipe (`| head`) predict stops
    quietly with exit code 141. Nothing is written into the workdir.

    Example: ls data/test/*/* | mlfd predict -w DIR --dataset NAME -
    """
    from mlfd.engine.progress import log
    from mlfd.fastpaths import check_precision, precision
    from mlfd.stages.predict import Predictor, json_line, tsv_line
    from mlfd.storage.staging import set_read_only

    if not paths:
        raise MlfdError("predict needs image paths (or '-' to read them from stdin)")
    set_read_only()  # no lock is taken: the workdir is only read
    opts = session.opts(device)
    opts.precision = check_precision("auto")
    prec = precision(opts)  # what eval would autocast to on this device
    session.images(max_image_pixels, False)
    if model is not None:
        if workdir is not None or levels is not None or force:
            raise MlfdError("--model takes no --workdir, --levels or --force: the folder "
                            "holds one model")
        predictor = Predictor.from_export(model, dataset, opts.device, prec)
    else:
        if not dataset:
            raise MlfdError("predict needs --dataset NAME (whose student to run), or --model "
                            "DIR for an exported one")
        ws = session.open_workdir(workdir, [dataset], None, None, None, None, data_root, None,
                                  None, None, None, trust_data=trust_data)
        if amalgamated:
            predictor = Predictor.from_amalgamated(ws, dataset, None, levels, force,
                                                   opts.device, prec)
        else:
            predictor = Predictor.from_workdir(ws, dataset, levels, force, opts.device, prec)
    log(f"[predict] {predictor.source}")

    out = sys.stdout  # captured before a progress bar redirects sys.stdout to stderr
    fmt = json_line if json_out else tsv_line
    total = None if "-" in paths else len(paths)
    failed = 0
    try:
        for batch in predictor.predict(_paths(paths), batch_size, topk, total):
            lines = []
            for r in batch:
                if r.error is not None:
                    failed += 1
                    print(f"error: {r.path}: {r.error}", file=sys.stderr, flush=True)
                else:
                    lines.append(fmt(r) + "\n")
            out.write("".join(lines))
            out.flush()  # per batch, so `| head` sees lines while the rest is computed
    except BrokenPipeError:
        _closed_pipe()
    if failed:
        raise Exit(2)
