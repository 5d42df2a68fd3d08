"""--nproc N: the same command in N processes under torchrun, launched from this one."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from mlfd.errors import MlfdError
from mlfd_cli.errors import Exit
from mlfd_cli.session import check


def distribute(nproc, ws, opts, levels, sections: tuple[str, ...], dry_run: bool) -> None:
    """Check --nproc and that the batches split over the processes, before anything is
    written; with N > 1 run the command in N processes and leave with their exit code."""
    from mlfd.engine.distributed import under_torchrun, world

    if nproc is not None and under_torchrun():
        raise MlfdError("--nproc starts torchrun itself: drop it inside torchrun")
    if nproc is not None and nproc < 1:
        raise MlfdError(f"--nproc must be >= 1, got {nproc}")
    n = nproc or world()
    _check_split(ws, sections, n, f"--nproc {n}" if nproc else f"{n} torchrun processes")
    if n == 1 or nproc is None or dry_run:
        return
    import torch

    if opts.device.type == "cuda" and nproc > torch.cuda.device_count():
        raise MlfdError(f"--nproc {nproc}: only {torch.cuda.device_count()} CUDA device(s) "
                        "here (one per process); use fewer or --device cpu")
    check(ws, opts, levels)  # data and models: fail once, here, rather than in N processes
    raise Exit(_relaunch(nproc, ws))


def _check_split(ws, sections: tuple[str, ...], n: int, how: str) -> None:
    """Each training section's micro-batch must split evenly over ``n`` processes: every
    rank takes an equal share of each global batch."""
    for section in sections:
        cfgs = [(section, ws.exp.stage(section, None))]
        if section in ("teach", "distill"):  # datasets may have their own values
            cfgs += [(f"datasets[{e.name}].{section}", ws.exp.stage(section, e.name))
                     for e in ws.exp.datasets if getattr(e, section)]
        for label, cfg in cfgs:
            if cfg.micro_batch % n:
                accum = f" in {cfg.grad_accum} micro-batches" if cfg.grad_accum > 1 else ""
                raise MlfdError(f"{how}: {label}.batch_size {cfg.batch_size}{accum} does not "
                                f"split over {n} processes; use a --batch-size divisible by "
                                f"{n * cfg.grad_accum}")


def _relaunch(nproc: int, ws) -> int:
    """This command (minus --nproc) in ``nproc`` processes under torch.distributed.run,
    launched in this process so that a failure ends as one line, not torchrun's report."""
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    from mlfd.engine.distributed import ERRORS_ENV

    args, value = [], False  # the command line without --nproc N / --nproc=N
    for a in sys.argv[1:]:
        if not value and a != "--nproc" and not a.startswith("--nproc="):
            args.append(a)
        value = a == "--nproc" and not value  # the next item is its value
    if not any(a in ("--workdir", "-w") or a.startswith("--workdir=") for a in args):
        args += ["--workdir", str(ws.root)]  # found once, here
    # torchrun's default is one thread per process, announced in a banner
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.disable(logging.CRITICAL)  # torchrun's agent logs its every move at WARNING
    with tempfile.TemporaryDirectory(prefix="mlfd-ranks-") as errors:
        os.environ[ERRORS_ENV] = errors
        try:
            torchrun(parse_args(["--standalone", f"--nproc-per-node={nproc}",
                                 "-m", "mlfd_cli.main", *args]))
            return 0
        except ChildFailedError as e:
            return _rank_failure(e, Path(errors), nproc)
        except SignalException as e:  # Ctrl-C or a kill: torchrun stopped the ranks
            if 0 not in _rank_errors(Path(errors), own=True):  # rank 0 did not say so itself
                print("interrupted: finished results are kept; run the same command again "
                      "to resume (--restart to start over)", file=sys.stderr)
            return 128 + int(e.sigval)
        finally:
            os.environ.pop(ERRORS_ENV, None)
            logging.disable(logging.NOTSET)


def _rank_failure(err, folder: Path, nproc: int) -> int:
    """The exit code of a failed `--nproc` run. Rank 0 printed its own error; otherwise
    the first rank with one of its own (not a broken connection to a failed peer) has it
    shown here; failing that, the way the first process ended."""
    import signal

    said = _rank_errors(folder, own=True)
    if said:
        first = min(said)
        if first != 0:
            print(said[first]["line"], file=sys.stderr)
        return int(said[first]["code"])
    rank, failure = err.get_first_failure()
    code = int(failure.exitcode)
    how = f"exit code {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            how = f"signal {signal.Signals(-code).name}"
    print(f"error: process {rank} of {nproc} ended with {how}", file=sys.stderr)
    return code if code > 0 else 128 - code


def _rank_errors(folder: Path, own: bool = False) -> dict[int, dict]:
    """rank -> {code, line, secondary} the failed ranks of an `--nproc` run left (``own``:
    only errors of their own, not a lost connection to a failed peer)."""
    said = {}
    for f in folder.glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            doc = json.loads(f.read_text())
            if not (own and doc.get("secondary")):
                said[int(doc["rank"])] = doc
    return said
