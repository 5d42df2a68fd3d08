"""The verbs that read results: eval and export."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlfd.errors import MlfdError
from mlfd_cli import session
from mlfd_cli.app import (
    CacheUri,
    DataRoot,
    Datasets,
    Device,
    DropEmptyClasses,
    Json,
    MaxImagePixels,
    Pipeline,
    SkipBadImages,
    TrustData,
    Workdir,
    command,
)


@command("eval")
def eval_(workdir: Workdir = None, device: Device = "auto", data_root: DataRoot = None,
          trust_data: TrustData = False,
          json_out: Json = False, pipeline: Pipeline = "auto", cache_uri: CacheUri = None,
          skip_bad_images: SkipBadImages = False, max_image_pixels: MaxImagePixels = None,
          drop_empty_classes: DropEmptyClasses = False,
          plots: Annotated[bool, typer.Option(
              "--plots", metavar="",
              help="Also draw reports/embeddings-DATASET.png (t-SNE maps of the test "
                   "features of the teacher, joint teacher and student) and "
                   "reports/confusion-DATASET.png (student and teacher); needs "
                   "scikit-learn.")] = False):
    """Top-1/top-5 of every complete model and the paper-style comparison table.

    Incomplete, corrupt or stale results are listed with their status, never as results.

    Example: mlfd eval --workdir mlfd-runs/demo --json --plots
    """
    from mlfd.stages.scan import scan
    from mlfd.storage.staging import set_read_only

    opts = session.opts(device, pipeline)
    if plots:
        from mlfd.figures import require

        require()  # before any model is run
    session.images(max_image_pixels, drop_empty_classes)
    ws = session.open_workdir(workdir, None, None, None, None, None, data_root, None, None, None,
                              None, trust_data=trust_data)
    session.set_cache_uri(ws, cache_uri)
    set_read_only()  # eval takes no lock: it must not touch a running stage's files
    scan(ws, ws.exp.names(), skip_bad_images)  # the test images, as the models were made
    rows, reports = session.report(ws, opts, plots)
    session.emit(json_out, {"workdir": str(ws.root), "rows": rows, "reports": reports}, rows)


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
               "--force", metavar="", help="Export a stale or incomplete student too.")] = False,
           amalgamated: Annotated[bool, typer.Option(
               "--amalgamated", metavar="", help="Export the amalgamated student (mlfd distill "
                                     "--amalgamate): the --dataset's head as a plain timm "
                                     "classifier.")] = False,
           all_heads: Annotated[bool, typer.Option(
               "--all-heads", metavar="", help="With --amalgamated: every head (heads.safetensors) "
                                   "beside the backbone without classifier.")] = False,
           arch: Annotated[str | None, typer.Option(
               "--arch", metavar="ARCH", help="With --amalgamated: which one, where the "
                                              "workdir has several.")] = None):
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

    if amalgamated or all_heads or arch:
        return _export_amalgamated(out, workdir, dataset, levels, data_root, trust_data,
                                   json_out, force, all_heads, arch)
    if not dataset or len(dataset) != 1 or dataset[0] == "all":
        raise MlfdError("export takes exactly one --dataset NAME")
    ws = session.open_workdir(workdir, dataset, None, None, None, None, data_root, None, None,
                              None, None, trust_data=trust_data)
    set_read_only()  # no lock is taken: the workdir is only read
    doc = export_student(ws, dataset[0], out, levels, force)
    line = (f"exported {doc['dataset']} L{doc['levels']} student ({doc['status']}) "
            f"to {out}: model.safetensors, config.json")
    if json_out:
        log(line)
        sys.stdout.write(json.dumps(dict(doc, workdir=str(ws.root))) + "\n")
    else:
        print(line)


def _export_amalgamated(out, workdir, dataset, levels, data_root, trust_data, json_out, force,
                        all_heads, arch) -> None:
    from mlfd.engine.progress import log
    from mlfd.stages.export import export_amalgamated
    from mlfd.storage.staging import set_read_only

    if dataset and (len(dataset) != 1 or dataset[0] == "all"):
        raise MlfdError("export --amalgamated takes one --dataset NAME (or --all-heads)")
    ws = session.open_workdir(workdir, None, None, None, None, None, data_root, None, None,
                              None, None, trust_data=trust_data)
    set_read_only()  # no lock is taken: the workdir is only read
    doc = export_amalgamated(ws, dataset[0] if dataset else None, out, arch, levels, force,
                             all_heads)
    line = (f"exported amalgamated {doc['amalgamated']} L{doc['levels']} student "
            f"({doc['status']}), head(s) {', '.join(doc['heads'])}, to {out}: "
            + ", ".join(Path(f).name for f in doc["files"]))
    if json_out:
        log(line)
        sys.stdout.write(json.dumps(dict(doc, workdir=str(ws.root))) + "\n")
    else:
        print(line)
