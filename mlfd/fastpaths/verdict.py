"""The verdict of this environment: the check's report, cached as JSON in the user's cache
directory under a digest of :func:`mlfd.fastpaths.environment.env_key`, run when missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from . import environment


def cache_dir() -> Path:
    """Where verdicts are kept: $MLFD_CACHE_DIR, else the user's cache directory."""
    env = os.environ.get("MLFD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mlfd", appauthor=False))


def cache_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "fastpaths" / f"{digest}.json"


def _valid(doc, key: dict) -> bool:
    """A cached report is untrusted input: the right key and one well-formed row per path."""
    if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("rows"), list):
        return False
    rows = doc["rows"]
    well_formed = all(
        isinstance(r, dict) and r.get("status") in environment.STATUSES
        and isinstance(r.get("detail"), str) and isinstance(r.get("fix"), (str, type(None)))
        for r in rows)
    return well_formed and sorted(str(r.get("path")) for r in rows) == sorted(environment.PATHS)


def load_report(device: torch.device) -> dict | None:
    """The cached report of this environment, or None (never checked, or unreadable)."""
    key = environment.env_key(device)
    path = cache_file(key)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _valid(doc, key):
        return None
    return dict(doc, cached=True, cache_file=str(path))


def check(device: torch.device, refresh: bool = False) -> dict:
    """The report for this environment: from the cache, else run now and cached.

    ``{"key", "created", "rows": [{"path", "name", "status", "detail", "fix", "seconds"}],
    "cached": bool, "cache_file"}``. A cache that cannot be written is said, not fatal.
    """
    if not refresh:
        doc = load_report(device)
        if doc is not None:
            return doc
    from ..engine.progress import log

    # imported here: the probes' imports stay off runs with a cached verdict, and
    # `python -m mlfd.fastpaths.checks` does not find itself imported by its package
    from . import checks

    key = environment.env_key(device)
    path = cache_file(key)
    log(f"checking the fast paths on {key['device']} (once per environment; "
        "`mlfd info --check` shows the result)")
    # on CUDA in child processes: a faulting kernel must not take the run's context along
    rows = checks.run_isolated(device) if device.type == "cuda" else checks.run_all(device)
    doc = {"key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may write at once
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log(f"the fast-path check is not cached ({e.strerror or e}: {path}); "
            "set MLFD_CACHE_DIR to a writable folder")
    return dict(doc, cached=False, cache_file=str(path))
