"""Process groups for torchrun runs; a single process is rank 0 of a world of 1.

Every function is a no-op (or the identity) in a single process, so stages call them
unconditionally. Under torchrun every rank runs the same control flow: collectives where
the ranks must agree, writes on rank 0 only (see ``is_main``).

Two groups: the default one (gloo on CPU, NCCL for CUDA tensors) carries the training
collectives; a gloo "control" group with a long timeout carries barriers and object
broadcasts, where the other ranks may wait a long time for work rank 0 does alone
(extracting a cache). A rank that fails exits non-zero and torchrun stops the others, so
a long timeout never turns into a hang.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

# A folder the `--nproc` launcher gives its ranks: each failing rank leaves its one-line
# error there, so the launcher can show it once (ranks other than 0 print nothing).
ERRORS_ENV = "MLFD_RANK_ERRORS"

_CONTROL_TIMEOUT = datetime.timedelta(days=7)
_STATE: dict = {"control": None}


def world() -> int:
    """Processes in the run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (torchrun's RANK; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine: its CUDA device index."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world() -> int:
    """Processes of the run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    """Only rank 0 writes checkpoints, metrics, caches' metadata and reports."""
    return rank() == 0


def under_torchrun() -> bool:
    """Started by torchrun (or `--nproc`), whatever the world size."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    return world() > 1 and _dist().is_initialized()


def init() -> None:
    """Join torchrun's process group (env:// rendezvous); nothing in a single process."""
    if world() == 1:
        return
    dist = _dist()
    if dist.is_initialized():
        return
    if torch.cuda.is_available() and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"  # collectives follow their tensors' device
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    _STATE["control"] = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)


def shutdown() -> None:
    if active():
        _dist().destroy_process_group()
    _STATE["control"] = None


def barrier() -> None:
    """Wait until every rank is here (no timeout to speak of: see the module doc)."""
    if active():
        _dist().barrier(group=_STATE["control"])


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects: plans, epochs, flags)."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0, group=_STATE["control"])
    return box[0]


def gather_object(obj: T) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None on the others)."""
    if not active():
        return [obj]
    box = [None] * world() if is_main() else None
    _dist().gather_object(obj, box, dst=0, group=_STATE["control"])
    return box


def on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn`` run by rank 0 alone (a plan, a cache extraction: whatever reads state rank 0
    may change, or writes); the other ranks wait and get its result."""
    result = fn(*args, **kwargs) if is_main() else None
    return broadcast_object(result)


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce(values, op: str = "sum"):
    """Element-wise reduction over the ranks: a tensor (in place, also returned) or a
    sequence of numbers (returned as a list of floats; exact for integers below 2**53)."""
    if isinstance(values, torch.Tensor):
        if active():
            _dist().all_reduce(values, op=getattr(_dist().ReduceOp, _OPS[op]))
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return [float(v) for v in all_reduce(t, op)]


def all_reduce_sum(values):
    return all_reduce(values, "sum")


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank: all start from the same weights."""
    if not active():
        return
    dist = _dist()
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, at = [], 0
    for t in like:
        out.append(flat[at:at + t.numel()].view_as(t))
        at += t.numel()
    return out


def sum_gradients(module: torch.nn.Module) -> None:
    """Sum every parameter's gradient over the ranks: DDP's all-reduce, done after the
    backward passes of an optimiser step. The ranks' losses are already weighted by their
    share of the global batch, so the sum is the gradient of the global batch.

    A parameter no rank used keeps ``grad=None`` (the optimiser skips it, as in one
    process); one that only some ranks used gets zeros from the others. Unlike DDP's
    wrapper this works with any forward (heads called outside ``forward``, datasets absent
    from a rank's batch) and with ranks that have no batch at the end of an epoch."""
    if not active():
        return
    params = [p for p in module.parameters() if p.requires_grad]
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    for (device, dtype), ps in groups.items():
        used = torch.tensor([p.grad is not None for p in ps], dtype=dtype, device=device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        flat = torch.cat([_flat(grads), used])
        _dist().all_reduce(flat)
        n = flat.numel() - len(ps)
        for p, g, u in zip(ps, _unflat(flat[:n], grads), flat[n:].tolist()):
            p.grad = g if u > 0 else None  # views of the reduced buffer


def sync_buffers(module: torch.nn.Module) -> None:
    """Average floating buffers (BatchNorm running statistics, computed by each rank on its
    own share of the batches) and take rank 0's others (counters): after this every rank
    evaluates and saves the same model."""
    if not active():
        return
    dist = _dist()
    floats = [b for b in module.buffers() if b.is_floating_point()]
    for b in module.buffers():
        if not b.is_floating_point():
            dist.broadcast(b.data, src=0)
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for b in floats:
        by_kind.setdefault((b.device, b.dtype), []).append(b)
    for bs in by_kind.values():
        flat = _flat([b.data for b in bs])
        dist.all_reduce(flat)
        flat /= world()
        for b, v in zip(bs, _unflat(flat, bs)):
            b.data.copy_(v)
