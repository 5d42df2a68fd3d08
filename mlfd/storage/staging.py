"""Write-aside directories: work goes into ``.<name>.partial`` and replaces ``<name>`` only
when it is complete, so an interrupted re-run never loses the previous complete result.

Promotion is two renames (final -> ``.<name>.old``, staging -> final); ``recover`` finishes
one that a kill interrupted between them.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

# What the process is writing, for the Ctrl-C message ("... kept in X; run again to resume").
_NOTE: dict[str, str] = {}


def set_interrupt_note(note: str | None) -> None:
    if note is None:
        _NOTE.pop("note", None)
    else:
        _NOTE["note"] = note


def interrupt_note() -> str | None:
    return _NOTE.get("note")


class Sigterm:
    """SIGTERM (SLURM or Kubernetes preemption, `kill`) stops the run as Ctrl-C does: a
    KeyboardInterrupt in the main thread, so the same cleanup runs and the same
    `interrupted:` line is printed; ``terminated`` tells the two apart (exit 143, not 130).
    ``restore()`` puts the previous handler back (tests run many commands in one process)."""

    def __init__(self):
        self.terminated = False
        self._pid = os.getpid()
        self._installed = threading.current_thread() is threading.main_thread()  # or none
        if self._installed:
            # None: a handler not set from Python, which leaves the default in place
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker inherited it: die as it would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.terminated = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        if self._installed:
            self._installed = False
            signal.signal(signal.SIGTERM,
                          signal.SIG_DFL if self._previous is None else self._previous)


# Commands that hold no workdir lock (eval, --dry-run) must not finish another process's
# promotion: between its two renames that would make its second rename fail.
_READ_ONLY = {"on": False}


def set_read_only(on: bool = True) -> None:
    _READ_ONLY["on"] = on


class StagedDir:
    def __init__(self, final: Path):
        self.final = Path(final)
        self.staging = self.final.parent / f".{self.final.name}.partial"
        self.old = self.final.parent / f".{self.final.name}.old"

    def readable(self) -> Path:
        """Where the complete result is now: ``old`` only mid-promotion."""
        return self.old if not self.final.exists() and self.old.exists() else self.final

    def recover(self) -> None:
        if _READ_ONLY["on"]:
            return
        if self.old.exists():
            if not self.final.exists():
                os.replace(self.old, self.final)
            else:
                shutil.rmtree(self.old, ignore_errors=True)

    def promote(self, drop: tuple[str, ...] = ()) -> None:
        """Replace the final directory by the staged one, minus the files in ``drop``
        (resume bookkeeping that a complete result does not need)."""
        self.recover()
        for name in drop:
            (self.staging / name).unlink(missing_ok=True)
        if self.final.exists():
            os.replace(self.final, self.old)
        os.replace(self.staging, self.final)
        shutil.rmtree(self.old, ignore_errors=True)
