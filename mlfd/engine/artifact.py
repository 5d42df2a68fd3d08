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

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .checkpoint import load_meta_safe, save_checkpoint, verify_checkpoint
from .fingerprint import changes, digest
from .metrics import MetricsLog
from .staging import StagedDir, set_interrupt_note

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
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
            state = torch.load(art.staging / RESUME_FILE, map_location="cpu", weights_only=False)
            done = int(state["epoch"])
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            best, history = state["best"], state["history"]
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
        tmp = self.dir / (RESUME_FILE + ".tmp")
        torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": _rng_state(), "best": best,
                    "history": history}, tmp)
        os.replace(tmp, self.dir / RESUME_FILE)
        info = self.dir / (RESUME_INFO + ".tmp")
        info.write_text(json.dumps({"epoch": epoch,
                                    "fingerprint_digest": self.meta["fingerprint_digest"]}))
        os.replace(info, self.dir / RESUME_INFO)
        save_checkpoint(self.dir / "last", self.weights(), meta)
        for name, fn in self.extras.items():
            save_checkpoint(self.dir / name, fn(), dict(meta, kind=f"{meta.get('kind')}-{name}"))
        if improved:
            save_checkpoint(self.dir / "best", self.weights(), meta)
        set_interrupt_note(f"{self.title}: {epoch}/{epochs} epochs kept in {self.dir}; run the "
                           "same command again to resume (--restart to start over)")

    def finish(self) -> None:
        if distributed.is_main():
            if self.metrics is not None:
                self.metrics.close()  # TensorBoard's event file, before its directory moves
            self.artifact.promote(drop=(RESUME_FILE, RESUME_INFO))
        distributed.barrier()  # the promoted result is there for whatever reads it next
        set_interrupt_note(None)
