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


# Seeds the chunk shuffle apart from train_order's permutation of the same (seed, epoch).
_CHUNK_SHUFFLE_STREAM = 102
# The per-(chunk, epoch) view: apart from the per-sample one (chunk k is not sample k).
_CHUNK_VIEW_STREAM = 103


def chunk_order(
    n: int,
    epoch: int,
    seed: int,
    views: int,
    chunk_rows: int,
    window: int,
    rank: int = 0,
    world: int = 1,
) -> np.ndarray:
    """A chunk-shuffled epoch for caches too big for memory: read in windows, not rows.

    The samples fall in chunks of ``chunk_rows`` consecutive indices (the cache's chunk
    rows). The chunks are shuffled, taken ``window`` at a time, and the rows of each
    window shuffled together: a reader decodes each window's chunks once, and a batch
    still mixes ``window`` chunks from anywhere in the data (class-sorted data included).

    The view is drawn per (chunk, epoch), not per sample: every sample of a chunk takes
    the chunk's view that epoch, uniform over ``views`` and counter-based in (seed, chunk,
    epoch). A cache chunked one view at a time then reads 1/V of its bytes per epoch
    instead of all V views to use one; each sample still meets a fresh uniform view every
    epoch (but its chunk-mates meet the same one).

    Ranks take contiguous, disjoint slices of the epoch's window-major sequence that
    together cover every sample: each rank reads its own windows, sharing at most the one
    window split at each slice boundary. Slice sizes differ by at most one, the first
    ``n % world`` ranks taking one row more, exactly as train_order's ``rank::world`` split
    does, so whatever DDP does to equalise the step counts of one applies to the other.
    """
    if chunk_rows < 1 or window < 1:
        raise ValueError(f"chunk_rows and window must be >= 1, got {chunk_rows} and {window}")
    rng = np.random.default_rng([seed, epoch, _CHUNK_SHUFFLE_STREAM])
    n_chunks = -(-n // chunk_rows)
    position = np.empty(n_chunks, dtype=np.int64)  # where each chunk falls in the shuffle
    position[rng.permutation(n_chunks)] = np.arange(n_chunks)
    window_of = position[np.arange(n, dtype=np.int64) // chunk_rows] // window
    # window-major, random within a window (lexsort: the last key is the primary one)
    perm = np.lexsort((rng.random(n), window_of)).astype(np.int64)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    perm = perm[start:start + q + (rank < r)]
    V = int(views)
    chunk = perm // chunk_rows
    u = counter_uniform(seed, chunk, np.full_like(chunk, epoch), _CHUNK_VIEW_STREAM)
    view = np.minimum((u * V).astype(np.int64), V - 1)
    return np.stack([perm, view], axis=1)
