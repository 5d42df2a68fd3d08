"""Fast paths that check themselves (design §15): the verdict, its cache, and what `auto` uses.

Every fast path (the Triton KD kernel, torch.compile of the loss, DALI GPU decoding, bf16 /
fp16 autocast) is compared with its reference once per environment by
:mod:`mlfd.fastpaths.checks` (``mlfd info --check``). The report is cached as JSON in the
user's cache directory (``MLFD_CACHE_DIR``, else platformdirs' user cache dir), under a
digest of what could change the answer: the versions of mlfd, its kernel source, torch,
triton and every installed DALI wheel, the device and the driver.

On CUDA, ``auto`` uses only what passed, falling back along a fixed order with one
``warning:`` line naming the path, the cause and the fix:

* loss backend: triton -> compile -> torch
* pipeline:     DALI GPU (``dali``) -> DALI CPU (``dali-cpu``) -> torch
* precision:    bf16 -> fp16 with a GradScaler -> fp32

An explicit choice that did not pass is an error. On CPU nothing is checked at run time:
``auto`` is fp32, the torch loss and the pipeline :func:`mlfd.data.pipeline.build_pipeline`
picks. Resolved choices are memoised on the run's options (``RunOptions.fast``), so each
warning is printed once per command.

Layering: imported by mlfd.stages, mlfd.info and the CLI; imports mlfd.engine, mlfd.losses
and mlfd.data (lazily), never the other way round.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from .. import __version__
from ..errors import MlfdError

SCHEMA = 1  # bump when the probes change what they verify: old verdicts are then ignored
PATHS = {  # row id -> the name rows and warnings give it
    "triton": "Triton KD kernel",
    "compile": "torch.compile of the KD loss",
    "dali_driver": "DALI CUDA build vs driver",
    "dali_gpu_decode": "DALI GPU decoding",
    "dali_gpu_arrays": "DALI GPU array path",
    "dali_cpu": "DALI CPU pipeline",
    "bf16": "bf16 autocast",
    "fp16": "fp16 autocast with a GradScaler",
}
STATUSES = ("ok", "failed", "unavailable")

# Fallback orders: (choice, rows that must all be ok, how a warning names it).
CHAINS = {
    "loss": [("triton", ("triton",), "Triton KD kernel"),
             ("compile", ("compile",), "torch.compile of the loss"),
             ("torch", (), "the torch loss")],
    "pipeline": [("dali", ("dali_driver", "dali_gpu_decode", "dali_gpu_arrays"),
                  "DALI GPU decoding"),
                 ("dali-cpu", ("dali_cpu",), "DALI CPU"),
                 ("torch", (), "the torch pipeline")],
    "precision": [("bf16", ("bf16",), "bf16 autocast"),
                  ("fp16", ("fp16",), "fp16 autocast with a GradScaler"),
                  ("fp32", (), "fp32")],
}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


# ---- the environment ------------------------------------------------------------------------

_DALI_WHEEL = re.compile(r"^nvidia-dali(?:-(?:nightly|weekly))?-cuda(\d+)$")


def dali_wheels() -> dict[str, str]:
    """Installed DALI wheels, {distribution name: version}. Two share the import path
    ``nvidia.dali`` and overwrite each other's files: a broken install."""
    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if _DALI_WHEEL.match(name):
            found[name] = dist.version
    return dict(sorted(found.items()))


def wheel_cuda_major(name: str) -> int | None:
    """The CUDA major a DALI wheel is built for: nvidia-dali-cuda130 -> 13."""
    m = _DALI_WHEEL.match(name)
    return int(m.group(1)) // 10 if m else None


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion), or None without
    a driver. Asked of libcuda directly: a CPU build of torch cannot tell."""
    try:
        lib = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
    except (OSError, AttributeError):
        return None
    return v.value // 1000, (v.value % 1000) // 10


def needs_check(device: torch.device) -> bool:
    """Whether ``auto`` on this device is decided by the check (CUDA) or needs none (CPU)."""
    return device.type == "cuda"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()})"


def _kernel_digest() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("mlfd_kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], "kd_loss.py")
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def env_key(device: torch.device) -> dict:
    """What the verdict depends on; a change of any of it means a new check."""
    drv = driver_cuda_version()
    return {"schema": SCHEMA, "mlfd": __version__, "kernel": _kernel_digest(),
            "python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton"), "dali": dali_wheels(), "device": device_name(device),
            "driver": None if drv is None else f"{drv[0]}.{drv[1]}",
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}


# ---- the cached report ----------------------------------------------------------------------

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
    return all(isinstance(r, dict) and r.get("status") in STATUSES
               and isinstance(r.get("detail"), str) and isinstance(r.get("fix"), (str, type(None)))
               for r in rows) and sorted(str(r.get("path")) for r in rows) == sorted(PATHS)


def load_report(device: torch.device) -> dict | None:
    """The cached report of this environment, or None (never checked, or unreadable)."""
    key = env_key(device)
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
    from . import checks as fastchecks

    key = env_key(device)
    path = cache_file(key)
    log(f"checking the fast paths on {key['device']} (once per environment; "
        "`mlfd info --check` shows the result)")
    # on CUDA in child processes: a faulting kernel must not take the run's context along
    rows = fastchecks.run_isolated(device) if device.type == "cuda" else fastchecks.run_all(device)
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


# ---- decisions ------------------------------------------------------------------------------

def _rows(report: dict) -> dict[str, dict]:
    return {r["path"]: r for r in report["rows"]}


def _blocker(rows: dict[str, dict], ids) -> dict | None:
    """The first of ``ids`` that did not pass (a missing row counts as unavailable)."""
    for i in ids:
        r = rows.get(i, {"path": i, "name": PATHS.get(i, i), "status": "unavailable",
                         "detail": "not checked", "fix": None})
        if r["status"] != "ok":
            return r
    return None


def choose(kind: str, report: dict) -> tuple[str, str | None]:
    """(what ``auto`` uses, the warning text when that is a fallback) for a chain."""
    rows, first = _rows(report), None
    for choice, ids, label in CHAINS[kind]:  # the last choice needs no row: always taken
        blocked = _blocker(rows, ids)
        if blocked is None:
            if first is None:
                return choice, None
            was, r = first
            fix = f"; {r['fix']}" if r.get("fix") else ""
            return choice, f"{was} {r['status']} ({r['detail']}): using {label}{fix}"
        first = first or (label, blocked)
    raise AssertionError(f"the {kind} chain must end on a choice that needs no check")


def require(kind: str, choice: str, report: dict, what: str) -> None:
    """An explicit choice must have passed its check: else a one-line MlfdError."""
    _, ids, label = next(c for c in CHAINS[kind] if c[0] == choice)
    r = _blocker(_rows(report), ids)
    if r is not None:
        fix = f"; {r['fix']}" if r.get("fix") else ""
        raise MlfdError(f"{what}: {label} {r['status']} on this machine ({r['detail']}){fix}; "
                        "or leave it on auto to fall back")


def report_for(opts) -> dict:
    """The run's verdict (checked or read once per command)."""
    memo = opts.fast
    if "report" not in memo:
        memo["report"] = check(opts.device)
    return memo["report"]


def _auto(opts, kind: str) -> str:
    memo = opts.fast
    if ("auto", kind) not in memo:
        choice, warning = choose(kind, report_for(opts))
        if warning:
            from ..engine.progress import log

            log(f"warning: {warning}")
        memo[("auto", kind)] = choice
    return memo[("auto", kind)]


def loss_backend(opts, requested: str | None) -> str:
    """The loss backend a run uses for ``requested`` (None/"auto" or a backend name)."""
    from ..losses.kd import resolve_backend

    name = (requested or "auto").lower()
    plain = resolve_backend(name, opts.device)  # names and device rules; auto -> torch
    if not needs_check(opts.device):
        return plain
    if name == "auto":
        return _auto(opts, "loss")
    if name != "torch":
        require("loss", name, report_for(opts), f"loss backend {name}")
    return name


def pipeline_backend(opts) -> str:
    """The pipeline a run uses: ``dali`` (on the run's device), ``dali-cpu`` or ``torch``."""
    from ..data.pipeline import resolve_pipeline

    name = (opts.pipeline or "auto").lower()
    if not needs_check(opts.device):
        return resolve_pipeline(name)
    if name == "auto":
        return _auto(opts, "pipeline")
    if name == "dali":
        require("pipeline", "dali", report_for(opts), "--pipeline dali")
    return resolve_pipeline(name)


def check_precision(name: str | None) -> str:
    name = (name or "auto").lower()
    if name not in PRECISIONS:
        raise MlfdError(f"unknown --precision {name!r}: choose {', '.join(PRECISIONS)}")
    return name


def precision(opts) -> str:
    """The training/inference precision a run uses: bf16, fp16 (with a GradScaler) or fp32."""
    name = check_precision(getattr(opts, "precision", "auto"))
    if not needs_check(opts.device):
        return "fp32" if name == "auto" else name
    if name == "auto":
        return _auto(opts, "precision")
    if name != "fp32":
        require("precision", name, report_for(opts), f"--precision {name}")
    return name


def used(opts, *, pipeline: bool = True, **extra) -> dict:
    """What a run records of how it ran (sidecar, metrics rows, eval rows)."""
    out = {"device": str(opts.device)}
    if pipeline:
        out["pipeline"] = pipeline_backend(opts)
    out["precision"] = precision(opts)
    return {**out, **extra}


def check_explicit(opts, loss: str | None = None) -> None:
    """Before a run writes anything: on CUDA, read (or make) the verdict and refuse an
    explicit choice that did not pass. ``auto`` choices are made, and warned about, where
    they are used."""
    from ..data.download import fetch_allowed

    if not needs_check(opts.device):
        check_precision(getattr(opts, "precision", "auto"))
        return
    if not fetch_allowed():  # a dry run writes nothing anywhere: a cached verdict or none
        cached = load_report(opts.device)
        if cached is None:
            return
        opts.fast["report"] = cached
    report_for(opts)
    if (opts.pipeline or "auto").lower() == "dali":
        pipeline_backend(opts)
    if check_precision(getattr(opts, "precision", "auto")) in ("bf16", "fp16"):
        precision(opts)
    name = (opts.loss_backend or loss or "auto").lower()
    if name in ("triton", "compile"):
        loss_backend(opts, name)
