"""One directory per experiment: experiment file, checkpoints, caches, metrics, reports.

    <workdir>/experiment.yaml
    <workdir>/teachers/<dataset>/{best,last}.{safetensors,json}, metrics.jsonl
    <workdir>/cache/teachers-L<K>.zarr/<dataset>/<split>/   teacher embeddings at L_K
    <workdir>/cache/targets-L<K>.zarr/<dataset>/train/      joint-teacher logits + L1..LK
        (or under cache.uri: another directory or an fsspec URL such as s3://bucket/prefix)
    <workdir>/joint/L<K>/{best,last}.*, metrics.jsonl
    <workdir>/students/<dataset>/L<K>/{best,last}.*, adaptors.safetensors, metrics.jsonl
    <workdir>/reports/results.{json,md}, curves-*.png
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from .config import Experiment
from .errors import FilesystemError, MlfdError, WorkdirBusy

EXPERIMENT_FILE = "experiment.yaml"
LOCK_FILE = ".mlfd.lock"
RUNS_DIR = Path("mlfd-runs")  # where commands without --workdir put and look for experiments


def find_experiments(root: Path = RUNS_DIR) -> list[Path]:
    """The workdirs directly under ``root`` that hold an experiment file, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / EXPERIMENT_FILE).is_file())


@dataclass
class Workspace:
    root: Path
    exp: Experiment
    data_root: str | None = None
    is_new: bool = False  # the experiment is not saved yet (see ``create``)

    @classmethod
    def open(cls, root: Path, new: Experiment | None = None, data_root: str | None = None,
             ) -> Workspace:
        """The existing workspace, or a new one from ``new``; nothing is written yet."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise FilesystemError(f"workdir {root} exists and is not a directory")
        path = root / EXPERIMENT_FILE
        if path.exists():
            exp, is_new = Experiment.load(path), False
        elif new is not None:
            exp, is_new = new, True
        else:
            raise MlfdError(
                f"{root} has no {EXPERIMENT_FILE}: start one with --preset demo|paper-t1|paper-t2, "
                "--teacher DATASET=ARCH (twice or more) or a --dataset that belongs to a preset"
            )
        exp.validate()
        return cls(root, exp, data_root, is_new)

    def create(self) -> None:
        """Write a new experiment's file; call only once every option was validated.

        An existing one gets this run's cache location (--cache-uri) written into it: it
        says where the caches are, so later runs without the option must find them there."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / EXPERIMENT_FILE
        if self.is_new:
            self.exp.save(path)
            self.is_new = False
        elif (on_disk := Experiment.load(path)).cache.uri != self.exp.cache.uri:
            on_disk.cache.uri = self.exp.cache.uri
            on_disk.save(path)

    def record_imports(self, names: list[str]) -> None:
        """Write the imported teachers of ``names`` into experiment.yaml, and nothing else
        (this run's --epochs/--lr/... overrides stay out of the file)."""
        path = self.root / EXPERIMENT_FILE
        on_disk = Experiment.load(path)
        for n in names:
            on_disk.entry(n).teacher = self.exp.entry(n).teacher
        on_disk.save(path)

    @contextlib.contextmanager
    def locked(self):
        """Hold the workdir's lock: a second mlfd run on it is refused with the holder's pid.

        flock is released by the kernel when the process dies, so a killed run leaves no
        stale lock behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirBusy(f"workdir {self.root} is in use by another mlfd run (pid "
                                  f"{holder}, lock {path}); wait for it to finish") from None
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # --- paths -----------------------------------------------------------------------
    def teacher_dir(self, name: str) -> Path:
        return self.root / "teachers" / name

    def joint_dir(self, levels: int) -> Path:
        return self.root / "joint" / f"L{levels}"

    def student_dir(self, name: str, levels: int) -> Path:
        return self.root / "students" / name / f"L{levels}"

    def cache_root(self) -> Path | str:
        """Where cache stores live: <workdir>/cache, or cache.uri (a local path, relative
        to the workdir if relative, or an fsspec URL string)."""
        from .storage.uri import cache_root

        return cache_root(self.exp.cache.uri, self.root) if self.exp.cache.uri \
            else self.root / "cache"

    def teacher_cache(self, levels: int) -> Path | str:
        from .storage.uri import join

        return join(self.cache_root(), f"teachers-L{levels}.zarr")

    def target_cache(self, levels: int) -> Path | str:
        from .storage.uri import join

        return join(self.cache_root(), f"targets-L{levels}.zarr")

    @property
    def reports(self) -> Path:
        return self.root / "reports"
