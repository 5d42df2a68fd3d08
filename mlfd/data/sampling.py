"""Which (sample index, view id) pairs a pass visits, in which order, on which rank.

Both pipeline backends consume these (M, 2) int64 arrays, so ordering, sharding and
view choice are decided once, independently of how pixels are produced.
"""

from __future__ import annotations

import numpy as np

from .views import counter_uniform

# Stream ids for counter_uniform that are not view geometry.
_VIEW_CHOICE_STREAM = 101


def shard_indices(n: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Contiguous, disjoint, complete split of range(n) over ranks (chunk-friendly for caches)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    bounds = np.linspace(0, n, world + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.int64)


def eval_order(n: int, views: int = 1, rank: int = 0, world: int = 1) -> np.ndarray:
    """Every sample of the shard exactly once per view, sample-major, in index order."""
    idx = shard_indices(n, rank, world)
    pairs = np.stack(np.meshgrid(idx, np.arange(views, dtype=np.int64), indexing="ij"), -1)
    return pairs.reshape(-1, 2)


def train_order(
    n: int,
    epoch: int,
    seed: int,
    views: int | str = "fresh",
    rank: int = 0,
    world: int = 1,
) -> np.ndarray:
    """A per-epoch shuffle; each rank takes every world-th element (disjoint, complete).

    ``views``: "fresh" gives each sample a new replayable view every epoch (teacher
    training); an int V picks one of the V cached views (distillation against cached
    targets); "clean" always uses view 0.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)[rank::world]
    if views == "fresh":
        view = np.full_like(perm, epoch + 1)
    elif views == "clean":
        view = np.zeros_like(perm)
    else:
        V = int(views)
        u = counter_uniform(seed, perm, np.full_like(perm, epoch), _VIEW_CHOICE_STREAM)
        view = np.minimum((u * V).astype(np.int64), V - 1)
    return np.stack([perm, view], axis=1)
