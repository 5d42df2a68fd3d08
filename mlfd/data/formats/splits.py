"""Exact-duplicate removal and seeded, class-stratified sampling and splitting."""

from __future__ import annotations

import hashlib

import numpy as np


def dedupe(images: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the first occurrence of every distinct image."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    return np.sort(first)


def seeded_order(indices: np.ndarray, seed: int, salt: str) -> np.ndarray:
    """``indices`` in a pseudo-random order fixed by (seed, salt).

    Keys are hashes rather than numpy's RNG streams, so the order (and hence the shipped
    demo subsets) cannot change with the numpy version.
    """
    keys = [
        int.from_bytes(
            hashlib.blake2b(f"{salt}:{seed}:{i}".encode(), digest_size=8).digest(), "big"
        )
        for i in indices.tolist()
    ]
    return np.asarray(indices)[np.argsort(np.asarray(keys, np.uint64), kind="stable")]


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes proportionally to ``counts`` (largest remainder)."""
    exact = counts * (total / counts.sum())
    alloc = np.floor(exact).astype(np.int64)
    remainder = exact - alloc
    # Ties broken by class index so the result is deterministic.
    for k in np.argsort(-remainder, kind="stable")[: total - alloc.sum()]:
        alloc[k] += 1
    return np.minimum(alloc, counts)


def stratified_sample(labels: np.ndarray, n: int, seed: int, salt: str = "sample") -> np.ndarray:
    """``n`` positions into ``labels`` with class proportions kept, in seeded order."""
    labels = np.asarray(labels)
    if n > len(labels):
        raise ValueError(f"cannot sample {n} from {len(labels)} items")
    classes, counts = np.unique(labels, return_counts=True)
    chosen = []
    for cls, take in zip(classes, _allocate(counts, n), strict=True):
        members = np.flatnonzero(labels == cls)
        chosen.append(seeded_order(members, seed, f"{salt}/class{cls}")[:take])
    return seeded_order(np.concatenate(chosen), seed, f"{salt}/mix")


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int, salt: str = "split"
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, test) positions into ``labels``, each class split by the fraction."""
    labels = np.asarray(labels)
    n_test = int(round(len(labels) * test_fraction))
    test = stratified_sample(labels, n_test, seed, salt)
    rest = np.setdiff1d(np.arange(len(labels)), test)
    return seeded_order(rest, seed, f"{salt}/train"), test


def dedupe_and_split(
    images: np.ndarray, labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Drop exact duplicate images, then a seeded stratified split: no test image is in train.

    Shared by the ``animal-mnist`` loader and the demo-subset builder.
    """
    keep = dedupe(images)
    train, test = stratified_split(labels[keep], test_fraction, seed)
    return {
        "train": (images[keep[train]], labels[keep[train]]),
        "test": (images[keep[test]], labels[keep[test]]),
    }
