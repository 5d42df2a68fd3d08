"""Zarr v3 store of teacher outputs, fingerprinted, resumable and checked for damage.

``layout``: where the files lie, chunking, codecs, stored dtypes; ``integrity``: manifest,
checksums, damage and ownership marks; ``writer``: staged, resumable, sharded writes;
``reader``: ``CacheGroup``, a group's state and whole-array reads; ``stream``: streamed
reads of targets too big for memory.
"""

from ..storage.fingerprint import digest
from .integrity import DECODE_ERRORS, describe_difference, foreign, record_damage
from .layout import (
    BOOKKEEPING,
    DAMAGED,
    MANIFEST,
    PROGRESS,
    VERIFIED,
    rank_progress,
    stores_under,
    to_tensor,
)
from .reader import CacheGroup
from .stream import (
    EpochStream,
    TargetStream,
    available_host_memory,
    default_budget,
    format_size,
    gather_rows,
    iter_windows,
    order_windows,
    parse_size,
)
from .writer import CacheWriter, shard_ranges

__all__ = [
    "BOOKKEEPING", "DAMAGED", "DECODE_ERRORS", "MANIFEST", "PROGRESS", "VERIFIED", "CacheGroup",
    "CacheWriter", "EpochStream", "TargetStream", "available_host_memory", "default_budget",
    "describe_difference", "digest", "foreign", "format_size", "gather_rows", "iter_windows",
    "order_windows", "parse_size", "rank_progress", "record_damage", "shard_ranges",
    "stores_under", "to_tensor",
]
