"""The epoch loop every training stage shares: AMP, schedule, progress, metrics, checkpoints."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MlfdError
from . import bn, distributed
from .artifact import TrainRun
from .optim import build_optimizer, build_scheduler
from .progress import log, progress


def _rank_seed(base: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([base, epoch, rank]).generate_state(1)[0])


def _reduce_sums(seen: int, sums: dict) -> tuple[int, dict]:
    """Items and loss sums of the epoch over all ranks (the same keys on every rank: rank
    0's, which has at least as many samples as any other)."""
    if distributed.world() == 1:
        return seen, sums
    keys = distributed.broadcast_object(list(sums))
    values = distributed.all_reduce_sum([seen, *(float(sums.get(k, 0.0)) for k in keys)])
    return int(values[0]), dict(zip(keys, values[1:]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device: torch.device) -> str:
    """Without a verdict of mlfd.fastpaths: fp32 on CPU; on CUDA bf16 where the GPU has it
    natively, else fp16 (T4 and V100 emulate bf16 slowly)."""
    if device.type != "cuda":
        return "fp32"
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3
        native = torch.cuda.is_bf16_supported()
    return "bf16" if native else "fp16"


def autocast(device: torch.device, precision: str | None = None):
    """Autocast to ``precision`` (bf16 | fp16 | fp32; None: default_precision)."""
    precision = precision or default_precision(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _AMP:
        raise MlfdError(f"unknown precision {precision!r}: choose bf16, fp16 or fp32")
    return torch.autocast(device.type, dtype=_AMP[precision])


def grad_scaler(device: torch.device, precision: str | None):
    """fp16 gradients underflow without loss scaling: a GradScaler for fp16, else None."""
    if (precision or default_precision(device)) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def _precise_bn(model, run: TrainRun, batches, step, device, precision, steps: int) -> None:
    """Before the last evaluation, and so before the model is saved, cached, exported or
    used as a teacher: BatchNorm statistics of the final weights (engine.bn) when the
    model took fewer than bn.STEPS optimiser steps; recorded in its metadata."""
    if steps >= bn.STEPS or not bn.bn_layers(model):
        run.meta["bn_recalibrated"] = None
        return

    def forward(batch):
        with autocast(device, precision):
            return step(batch)[2]  # the stage's own forward, in train mode, no gradients

    t0 = time.perf_counter()
    images = bn.recalibrate(model, batches, forward)
    run.meta["bn_recalibrated"] = {"images": images * distributed.world(), "steps": steps}
    log(f"BatchNorm statistics recomputed on {images * distributed.world()} training images "
        f"({steps} optimiser steps < {bn.STEPS}) in {time.perf_counter() - t0:.1f} s")


@dataclass
class FitResult:
    best: dict
    last: dict
    history: list[dict]


def fit(
    *,
    title: str,
    model: torch.nn.Module,
    cfg,
    device: torch.device,
    steps_per_epoch: int,
    batches: Callable[[int], Iterable],
    step: Callable[[object], tuple[torch.Tensor, dict, int]],
    evaluate: Callable[[], dict],
    run: TrainRun,
    select: str = "top1",
    used: dict | None = None,
) -> FitResult:
    """Train ``model`` for cfg.epochs; ``step`` returns (loss, logged terms, items in batch).

    ``batches(epoch)`` yields ``steps_per_epoch`` micro-batches of ``cfg.micro_batch``; the
    optimiser steps once per ``cfg.grad_accum`` of them (and after an epoch's last one).
    Resumes a staged run of the same fingerprint (``run.begin``). After each epoch,
    ``evaluate()`` gives metrics and ``run.end_epoch`` checkpoints everything needed to
    resume; after the last one the result is promoted over the previous complete one.

    Under torchrun every rank calls this with its share of each global micro-batch
    (``batches`` shards by rank; ``steps_per_epoch`` counts global steps, and a rank whose
    share of the last one is empty sits it out). Gradients are summed over the ranks before
    each optimiser step, each rank's loss weighted by its share of the global micro-batch:
    the update is the one process's. Metrics are reduced over the ranks, BatchNorm
    statistics averaged before evaluating, and only rank 0 writes (TrainRun).

    ``used`` says how the run runs (mlfd.fastpaths.used: device, pipeline, precision, loss
    backend); its ``precision`` picks the autocast (fp16 adds a GradScaler) and all of it
    is recorded in the checkpoints' metadata and in every metrics row.
    """
    used = dict(used or {})
    precision = used.setdefault("precision", default_precision(device))
    run.meta.update(used)
    scaler = grad_scaler(device, precision)
    accum = getattr(cfg, "grad_accum", 1)
    W = distributed.world()
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_scheduler(opt, cfg, -(-steps_per_epoch // accum))
    base_seed = torch.initial_seed()  # the stage's seed (seed_everything)
    start, best, history = run.begin(model, opt, sched)
    distributed.broadcast_module(model)
    last = history[-1] if history else None
    if start:
        log(f"{title}: resuming after epoch {start}/{cfg.epochs} from {run.dir}")
    if start == cfg.epochs and history:  # killed after the last epoch's state, before its
        # checkpoints or the promotion: write them from that state, then promote
        run.end_epoch(start, cfg.epochs, history[-1], False, model, opt, sched, best, history)
    with progress() as prog:
        ep_task = prog.add_task(f"{title} epochs", total=cfg.epochs, completed=start, items=0,
                                info="", unit="img")
        done_items = 0  # images trained in this run (all ranks): the outer bar's rate
        for epoch in range(start, cfg.epochs):
            if W > 1:
                # Dropout and drop-path draw from torch's global RNG: each rank its own
                # stream (views are counter-based and need none). Results then match one
                # process within noise, not bitwise; reseeding per epoch also makes a
                # resumed run repeat the uninterrupted one.
                torch.manual_seed(_rank_seed(base_seed, epoch, distributed.rank()))
            model.train()
            task = prog.add_task(f"  epoch {epoch + 1}", total=steps_per_epoch, items=0, info="",
                                 unit="img")
            sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step
            seen, t0 = 0, time.perf_counter()
            opt.zero_grad(set_to_none=True)
            it = iter(batches(epoch))
            for i in range(steps_per_epoch):
                batch = next(it, None)
                if batch is None and W == 1:
                    break
                if batch is not None:
                    with autocast(device, precision):
                        loss, terms, n = step(batch)
                else:  # this rank's share of the epoch's last global batch is empty
                    loss, terms, n = None, {}, 0
                if W > 1:
                    # Weight by this rank's share of the global micro-batch: the summed
                    # gradients are then the global batch's mean, even when the last batch
                    # splits unevenly (the same gradient as one process).
                    total = distributed.all_reduce_sum([n])[0]
                    scaled = None if loss is None else loss * (n / total)
                else:
                    scaled = loss
                if scaled is not None:
                    scaled = scaled / accum if accum > 1 else scaled
                    (scaler.scale(scaled) if scaler else scaled).backward()
                if (i + 1) % accum == 0 or i == steps_per_epoch - 1:
                    distributed.sum_gradients(model)
                    if scaler:  # skips the step when the summed gradients overflowed
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                if loss is None:
                    continue
                seen += n
                for k, v in {"loss": loss.detach(), **terms}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * n
                if i % 20 == 0 or i == steps_per_epoch - 1:  # sync only now and then
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise MlfdError(f"{title}: loss became {value} at epoch {epoch + 1}; "
                                        "lower --lr")
                    prog.update(task, completed=i + 1, items=seen * W, info=f"loss {value:.3f}")
                    prog.update(ep_task, completed=epoch + (i + 1) / steps_per_epoch,
                                items=done_items + seen * W)
            if hasattr(it, "close"):  # a generator's cleanup (reader threads) runs now
                it.close()
            prog.remove_task(task)
            train_time = time.perf_counter() - t0
            seen, sums = _reduce_sums(seen, sums)
            row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                   "train_images_per_s": seen / max(train_time, 1e-9),
                   **{f"train_{k}": float(v) / max(seen, 1) for k, v in sums.items()}}
            if epoch + 1 == cfg.epochs:
                _precise_bn(model, run, batches(epoch), step, device, precision,
                            (epoch + 1) * -(-steps_per_epoch // accum))
            distributed.sync_buffers(model)  # every rank evaluates and saves the same model
            model.eval()
            with torch.no_grad(), autocast(device, precision):
                row.update(evaluate())
            row.update(used)
            history.append(row)
            last = row
            improved = best is None or row.get(select, -math.inf) > best.get(select, -math.inf)
            best = row if improved else best
            run.end_epoch(epoch + 1, cfg.epochs, row, improved, model, opt, sched, best, history)
            done_items += seen
            prog.update(ep_task, completed=epoch + 1, items=done_items,
                        info=f"{select} {row.get(select, float('nan')):.4f}")
            log(f"{title} epoch {epoch + 1}/{cfg.epochs}: "
                + ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in row.items()
                            if k.startswith(("train_loss", "top1", "top5")) or k.endswith("top1")))
    run.finish()
    return FitResult(best=best or {}, last=last or {}, history=history)
