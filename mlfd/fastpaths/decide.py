"""What a run uses: ``auto`` resolved from the verdict, explicit choices held to it.

On CUDA, ``auto`` uses only what passed, falling back along :data:`CHAINS` with one
``warning:`` line naming the path, the cause and the fix; an explicit choice that did not
pass is an error. On CPU nothing is checked at run time. Choices are memoised on the run's
options (``RunOptions.fast``), so each warning is printed once per command.
"""

from __future__ import annotations

from ..errors import MlfdError
from . import environment, verdict

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


def _rows(report: dict) -> dict[str, dict]:
    return {r["path"]: r for r in report["rows"]}


def _blocker(rows: dict[str, dict], ids) -> dict | None:
    """The first of ``ids`` that did not pass (a missing row counts as unavailable)."""
    for i in ids:
        r = rows.get(i, {"path": i, "name": environment.PATHS.get(i, i),
                         "status": "unavailable", "detail": "not checked", "fix": None})
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
        memo["report"] = verdict.check(opts.device)
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
    if not environment.needs_check(opts.device):
        return plain
    if name == "auto":
        return _auto(opts, "loss")
    if name != "torch":
        require("loss", name, report_for(opts), f"loss backend {name}")
    return name


def pipeline_backend(opts) -> str:
    """The pipeline a run uses: ``dali`` (on the run's device), ``dali-cpu`` or ``torch``."""
    from ..data.pipelines import resolve_pipeline

    name = (opts.pipeline or "auto").lower()
    if not environment.needs_check(opts.device):
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
    if not environment.needs_check(opts.device):
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

    if not environment.needs_check(opts.device):
        check_precision(getattr(opts, "precision", "auto"))
        return
    if not fetch_allowed():  # a dry run writes nothing anywhere: a cached verdict or none
        cached = verdict.load_report(opts.device)
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
