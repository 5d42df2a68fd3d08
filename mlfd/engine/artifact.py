"""A training stage's output directory: staging, resume state, atomic promotion, status.

    <parent>/<name>/             the last COMPLETE result: last/best checkpoints, metrics
    <parent>/.<name>.partial/    the run in progress: same files plus resume.pt
    <parent>/.<name>.old/        only for an instant while a finished run is promoted

A run trains into the staging directory and replaces the complete result only when its
last epoch is done, so an interrupted re-run never loses finished work. Every epoch
checkpoints model, optimiser, scheduler and RNG state; the next run with the same
fingerprint resumes from there.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..storage.diskio import write_atomic, write_text
from ..storage.fingerprint import changes, digest
from ..storage.staging import StagedDir, set_interrupt_note
from . import distributed
from .checkpoint import load_meta_safe, save_checkpoint, verify_checkpoint
from .metrics import MetricsLog
from .progress import log

RESUME_FILE = "resume.pt"  # model, optimiser, scheduler, RNG, best row, history
RESUME_INFO = "resume.json"  # its epoch and fingerprint: cheap to read for plans

@dataclass
class Status:
    state: str  # missing | corrupt | incomplete | stale | ok
    reason: str
    meta: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "ok"


class Artifact(StagedDir):
    """The directory lifecycle of one trained model (teacher, joint teacher, student...)."""

    def status(self, fingerprint: dict | None = None) -> Status:
        """State of the complete result against the fingerprint the experiment asks for."""
        self.recover()
        stem = self.readable() / "last"
        if not stem.with_suffix(".json").exists() and not stem.with_suffix(".safetensors").exists():
            return Status("missing", "not trained yet")
        problem = verify_checkpoint(stem)
        if problem:
            return Status("corrupt", f"corrupt: {problem}")
        meta = load_meta_safe(stem) or {}
        if not meta.get("complete"):
            return Status("incomplete", f"incomplete (epoch {meta.get('epoch')})", meta)
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            what = changes(meta.get("fingerprint") or {}, fingerprint) or "fingerprint differs"
            return Status("stale", f"stale: {what}", meta)
        return Status("ok", "up to date", meta)

    def partial(self) -> dict | None:
        """Metadata of the staged run's last saved epoch, if one is in progress."""
        return load_meta_safe(self.staging / "last") if self.staging.is_dir() else None

    def resumable_epoch(self, fingerprint: dict) -> int:
        """Epochs a staged run with this fingerprint has finished (0: none to resume), as
        its resume state says: a kill may fall between that state and the checkpoints."""
        try:
            info = json.loads((self.staging / RESUME_INFO).read_text())
        except (OSError, ValueError):
            return 0
        if not isinstance(info, dict) or info.get("fingerprint_digest") != digest(fingerprint):
            return 0
        return int(info.get("epoch") or 0) if (self.staging / RESUME_FILE).exists() else 0


def _rng_state() -> dict:
    """Every generator's state in types that ``torch.load(weights_only=True)`` reads back
    (numpy's key array as a tensor, not an ndarray: no allowlist needed)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # or an older file's array
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Resume files of earlier versions hold numpy's RNG keys as a uint32 ndarray: these
# globals rebuild one (numpy's own reduce function for arrays, whatever its module is
# called in this numpy), and nothing else; anything else a file names is refused.
_NUMPY_ARRAY = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(0).__reduce__()[0]]


def load_resume(path: Path) -> dict:
    """A resume state, read without running code from the file: the workdir may come from
    anywhere (design: trust boundaries). Raises on a damaged or foreign file."""
    with torch.serialization.safe_globals(_NUMPY_ARRAY):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"holds a {type(state).__name__}, not a resume state")
    missing = [k for k in ("epoch", "model", "optimizer", "scheduler", "rng", "best",
                           "history") if k not in state]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    best, history = state["best"], state["history"]
    if not (best is None or isinstance(best, dict)) or not isinstance(history, list) \
            or not all(isinstance(r, dict) for r in history):
        raise ValueError("its best row and history are not metric rows")
    return state


def _why(e: Exception) -> str:
    """A load error's gist in one short line, without torch's advice to load the file
    unrestricted (which would run the code it names)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
    text = " ".join((m.group(1) if m else text).split()).split(". ")[0]
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _plain(value):
    """Metric rows as JSON types, which ``weights_only`` loads (no numpy scalars)."""
    return json.loads(json.dumps(value, default=float))


class TrainRun:
    """What ``fit`` needs to write a stage's result: staging, per-epoch state, promotion.

    ``weights()`` gives the exported state dict (e.g. the plain timm model); ``extras`` are
    further state dicts saved beside it at every epoch (e.g. a student's adaptors).
    """

    def __init__(self, final: Path, meta: dict, fingerprint: dict, weights,
                 extras: dict | None = None, restart: bool = False, title: str = ""):
        self.artifact = Artifact(final)
        self.fingerprint = fingerprint
        self.meta = dict(meta, fingerprint=fingerprint, fingerprint_digest=digest(fingerprint))
        self.weights, self.extras = weights, extras or {}
        self.restart, self.title = restart, title
        self.metrics: MetricsLog | None = None

    @property
    def dir(self) -> Path:
        return self.artifact.staging

    def begin(self, model, opt, sched) -> tuple[int, dict | None, list[dict]]:
        """(epochs already done, best row, history): resumed when a staged run matches."""
        art = self.artifact
        # Under torchrun rank 0 decides and writes; every rank loads its resume state.
        if distributed.is_main():
            art.recover()
        done = distributed.on_main(
            lambda: 0 if self.restart else art.resumable_epoch(self.fingerprint))
        if done:
            done, best, history = self._resume(model, opt, sched, done)
        if done:
            if distributed.is_main():
                self.metrics = MetricsLog(art.staging / "metrics.jsonl", fresh=False)
                self.metrics.keep_epochs(done)  # rows after the last checkpoint are dropped
        else:
            if distributed.is_main():
                if art.staging.exists():
                    shutil.rmtree(art.staging)
                art.staging.mkdir(parents=True)
                self.metrics = MetricsLog(art.staging / "metrics.jsonl")
            best, history = None, []
        distributed.barrier()  # every rank has read the state rank 0 overwrites at epoch end
        return done, best, history

    def _resume(self, model, opt, sched, info_epoch: int) -> tuple[int, dict | None, list[dict]]:
        """Load the staged resume state into model, optimiser, scheduler and RNGs. A file
        that cannot be read or applied (damaged, crafted, foreign) is one warning, and the
        run starts over from the state it had before: (0, None, [])."""
        path = self.dir / RESUME_FILE
        try:
            state, problem = load_resume(path), None
            done = int(state["epoch"])
            # the state is written before its info: a kill between them leaves it one ahead
            if done not in (info_epoch, info_epoch + 1):
                raise ValueError(f"epoch {done}, {RESUME_INFO} says {info_epoch}")
        except Exception as e:  # anything a damaged or hostile file makes torch raise
            state, problem = None, e
        # under torchrun all ranks resume or none does (each read the file itself)
        if distributed.world() > 1 and not distributed.all_reduce([state is not None], "min")[0]:
            state, problem = None, problem or RuntimeError("another rank could not read it")
        if state is not None:
            before = [copy.deepcopy(x.state_dict()) for x in (model, opt, sched)]
            rng = _rng_state()
            try:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                _set_rng_state(state["rng"])
                return done, state["best"], state["history"]
            except Exception as e:  # the same on every rank: one file, one model
                for x, s in zip((model, opt, sched), before):  # as before the attempt
                    x.load_state_dict(s)
                _set_rng_state(rng)
                problem = e
        log(f"warning: {path} is damaged or not a resume state of mlfd ({_why(problem)}); "
            f"{self.title or 'the run'} starts over")
        return 0, None, []

    def end_epoch(self, epoch: int, epochs: int, row: dict, improved: bool, model, opt, sched,
                  best: dict, history: list[dict]) -> None:
        if not distributed.is_main():
            return
        meta = dict(self.meta, epoch=epoch, epochs=epochs, metrics=row, complete=epoch == epochs)
        # Order matters for a kill at any point: the metrics row first (dropped again on
        # resume if the state below is older), then the resume state and its info (which
        # decide where a resume starts), then the checkpoints (rewritten by the resume).
        self.metrics.keep_epochs(epoch - 1)  # idempotent when an epoch is re-saved
        self.metrics.write(**row)
        state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": _rng_state(), "best": _plain(best),
                 "history": _plain(history)}
        write_atomic(self.dir / RESUME_FILE, lambda tmp: torch.save(state, tmp))
        write_text(self.dir / RESUME_INFO, json.dumps(
            {"epoch": epoch, "fingerprint_digest": self.meta["fingerprint_digest"]}))
        # from here on a re-run resumes after this epoch, whatever stops the rest
        set_interrupt_note(f"{self.title}: {epoch}/{epochs} epochs kept in {self.dir}; run the "
                           "same command again to resume (--restart to start over)")
        save_checkpoint(self.dir / "last", self.weights(), meta)
        for name, fn in self.extras.items():
            save_checkpoint(self.dir / name, fn(), dict(meta, kind=f"{meta.get('kind')}-{name}"))
        if improved:
            save_checkpoint(self.dir / "best", self.weights(), meta)

    def finish(self) -> None:
        if distributed.is_main():
            if self.metrics is not None:
                self.metrics.close()  # TensorBoard's event file, before its directory moves
            self.artifact.promote(drop=(RESUME_FILE, RESUME_INFO))
        distributed.barrier()  # the promoted result is there for whatever reads it next
        set_interrupt_note(None)
