"""The training verbs: teach, cache, fuse, distill, and check (the scan each run starts
with)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from mlfd.errors import MlfdError
from mlfd_cli import relaunch, session
from mlfd_cli.app import (
    BatchSize,
    CacheUri,
    DataRoot,
    Datasets,
    Device,
    DropEmptyClasses,
    DryRun,
    Epochs,
    Force,
    Holdout,
    InputSize,
    Json,
    Levels,
    LogTo,
    LossBackend,
    Lr,
    MaxImagePixels,
    Nproc,
    Pipeline,
    Precision,
    Preset,
    Restart,
    Seed,
    SkipBadImages,
    Teacher,
    TrustData,
    Workdir,
    command,
)


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
    from mlfd.data.pipelines import check_auto_augment
    from mlfd.engine.distributed import is_main, on_main
    from mlfd.engine.progress import log
    from mlfd.fastpaths import check_precision
    from mlfd.stages import teach as run
    from mlfd.stages.baselines import KINDS, train_baseline
    from mlfd.stages.plan import plan_baseline, plan_teach
    from mlfd.stages.scan import scan

    opts = session.opts(device, pipeline, force=force, restart=restart, log=log_to)
    opts.precision = check_precision(precision)
    session.images(max_image_pixels, drop_empty_classes)
    ws = session.open_workdir(workdir, dataset, preset, teacher, input_size, seed, data_root,
                              epochs, batch_size, lr, None, holdout, trust_data)
    if auto_augment is not None:
        policy = None if auto_augment.lower() == "none" else auto_augment
        ws.exp.teach.auto_augment = check_auto_augment(policy)
    if baseline and baseline not in KINDS:
        raise MlfdError(f"unknown --baseline {baseline!r}: choose {', '.join(KINDS)}")
    if arch is not None:
        session.default_size(arch)
    names = session.names(ws, dataset)
    changed = session.set_imports(ws, imports or [])
    if changed:
        names = [n for n in names if n in changed] if dataset else changed
    relaunch.distribute(nproc, ws, opts, None, ("teach",), dry_run)
    if dry_run and baseline:
        return session.dry_run(ws, opts, None, json_out, plan_baseline, baseline, arch,
                               input_size, force, restart)
    if dry_run:
        return session.dry_run(ws, opts, None, json_out, plan_teach, names, force, restart)
    with session.locked(ws, opts):
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
            session.emit(json_out, {"workdir": str(ws.root), "baseline": baseline, "metrics": res})
            return
        plan, results = on_main(plan_teach, ws, names, force, restart), {}
        for s in plan.reused:
            log(f"[teach] {s.target}: up to date (--force retrains)")
        for s in plan.steps:
            log(f"[teach] {s.target}: {s.reason}")
            results[s.target] = run(ws, opts, s.target)
    session.emit(json_out, {"workdir": str(ws.root), "trained": results})


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

    opts = session.opts(device, pipeline, force=force, restart=restart)
    session.images(max_image_pixels, drop_empty_classes)
    ws = session.open_workdir(workdir, dataset, preset, None, None, seed, data_root, None, None,
                              None, levels, trust_data=trust_data)
    session.set_cache_uri(ws, cache_uri)
    k = session.levels(ws, levels)
    relaunch.distribute(nproc, ws, opts, k, (), dry_run)
    if dry_run:
        return session.dry_run(ws, opts, k, json_out, plan_cache, k, force)

    with session.locked(ws, opts, k):  # under torchrun every rank extracts its own rows
        scan(ws, ws.exp.names(), skip_bad_images)
        done = {"teachers": cache_teachers(ws, opts, k), "targets": []}
        if on_main(joint_status, ws, k).ok:  # rank 0 decides for all
            done["targets"] = cache_targets(ws, opts, k)
    session.emit(json_out, {"workdir": str(ws.root), "levels": k, "written": done})


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

    opts = session.opts(device, force=force, restart=restart, log=log_to)
    session.images(max_image_pixels, drop_empty_classes)
    opts.precision = check_precision(precision)
    ws = session.open_workdir(workdir, None, preset, None, None, seed, data_root, epochs,
                              batch_size, lr, levels, trust_data=trust_data)
    session.set_cache_uri(ws, cache_uri)
    k = session.levels(ws, levels)
    relaunch.distribute(nproc, ws, opts, k, ("fuse",), dry_run)
    if dry_run:
        return session.dry_run(ws, opts, k, json_out, plan_fuse, k, force, restart)
    with session.locked(ws, opts, k):
        scan(ws, ws.exp.names(), skip_bad_images)  # the teachers' data, as they saw it
        st = on_main(joint_status, ws, k)  # under torchrun rank 0 decides for all
        if st.ok and not force:
            log(f"[fuse] joint teacher L{k}: up to date (--force retrains)")
            res = st.meta.get("metrics", {})
        else:
            log(f"[fuse] joint teacher L{k}: {st.reason}")
            res = run(ws, opts, k)
    session.emit(json_out, {"workdir": str(ws.root), "levels": k, "metrics": res})


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
            drop_empty_classes: DropEmptyClasses = False,
            amalgamate: Annotated[str | None, typer.Option(
                "--amalgamate", metavar="ARCH",
                help="Train ONE student of timm architecture ARCH with a head per dataset, "
                     "on all datasets, from the same joint targets (instead of one student "
                     "per dataset); saved under students/amalgamated-ARCH/LK.")] = None):
    """Distil students; first runs (and announces) any missing or stale teach/cache/fuse step.

    Up-to-date results are reused; the plan says why each step runs. Interrupted
    training resumes from its last finished epoch (--restart starts over). Image
    datasets are scanned first, as `mlfd check` does.

    Examples:\n
      mlfd distill --dataset fashion-mnist-mini --levels 2\n
      mlfd distill --dataset all --levels 1 --workdir mlfd-runs/demo\n
      mlfd distill --amalgamate test_convnext --levels 2 --workdir mlfd-runs/demo\n
      mlfd distill --teacher data/a.npz=resnet18 --teacher data/b=efficientnet_b0 --dataset a
    """
    from mlfd.cache.stream import parse_size
    from mlfd.fastpaths import check_precision
    from mlfd.stages import plan_distill, run_distill
    from mlfd.stages.distill import cache_budget

    opts = session.opts(device, pipeline, loss_backend, force, restart, log_to)
    opts.precision = check_precision(precision)
    session.images(max_image_pixels, drop_empty_classes)
    if cache_memory is not None:
        opts.cache_memory = parse_size(cache_memory)
    ws = session.open_workdir(workdir, dataset, preset, teacher, input_size, seed, data_root,
                              epochs, batch_size, lr, levels, holdout, trust_data)
    session.set_cache_uri(ws, cache_uri)
    k = session.levels(ws, levels)
    names = session.names(ws, dataset)
    if amalgamate is not None:
        if dataset and "all" not in dataset:
            raise MlfdError("--amalgamate trains one student on every dataset of the "
                            "experiment: leave out --dataset")
        from mlfd.stages.amalgamate import check_arch

        check_arch(amalgamate)
    relaunch.distribute(nproc, ws, opts, k, ("teach", "fuse", "distill"), dry_run)
    if dry_run:
        return session.dry_run(ws, opts, k, json_out, plan_distill, names, k, force, restart,
                               cache_budget(opts, nproc),  # the budget each of nproc would have
                               amalgamate)
    with session.locked(ws, opts, k):
        steps = run_distill(ws, opts, names, k, skip_bad_images, amalgamate)
        rows, reports = session.report(ws, opts)
    session.emit(json_out, {"workdir": str(ws.root), "levels": k, "steps": [vars(s) for s in steps],
                            "rows": rows, "reports": reports}, rows)


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

    opts = session.opts("cpu")
    session.images(max_image_pixels, drop_empty_classes)
    ws = session.open_workdir(workdir, dataset, preset, teacher, None, None, data_root, None,
                              None, None, None, trust_data=trust_data)
    names = session.names(ws, dataset)
    with session.locked(ws, opts):
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
