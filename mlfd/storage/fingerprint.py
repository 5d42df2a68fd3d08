"""Fingerprints: flat dicts of everything a result depends on, and what changed between two.

Each stage stores the fingerprint of its inputs beside its output. The plan compares the
stored one with the one the experiment asks for now and names the differences
("teach.lr 0.002 → 0.001"), so a user sees why a stage is redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts/dataclasses/lists to {"a.b": value}; lists stay values (compared whole)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) or dataclasses.is_dataclass(value):
            out.update(flatten(value, name))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _short(value) -> str:
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "…"
    return str(value)


def changes(old: dict, new: dict, limit: int = 4) -> str:
    """``"teach.lr 0.002 → 0.001; seed 0 → 1"``: the keys whose values differ (JSON-normalised,
    so 1 and 1.0 or a tuple and a list are equal)."""
    norm = lambda d: json.loads(json.dumps(d, default=str))  # noqa: E731
    old, new = norm(old), norm(new)
    diffs = [f"{k} {_short(old.get(k, '<absent>'))} → {_short(new.get(k, '<absent>'))}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"and {len(diffs) - limit} more"]
    return "; ".join(diffs)
