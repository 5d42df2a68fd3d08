"""One directory per experiment: experiment file, checkpoints, caches, metrics, reports.

    <workdir>/experiment.yaml
    <workdir>/teachers/<dataset>/{best,last}.{safetensors,json}, metrics.jsonl
    <workdir>/cache/teachers-L<K>.zarr/<dataset>/<split>/   teacher embeddings at L_K
    <workdir>/cache/targets-L<K>.zarr/<dataset>/train/      joint-teacher logits + L1..LK
    <workdir>/joint/L<K>/{best,last}.*, metrics.jsonl
    <workdir>/students/<dataset>/L<K>/{best,last}.*, adaptors.safetensors, metrics.jsonl
    <workdir>/reports/results.{json,md}, curves-*.png
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import Experiment
from .errors import MlfdError

EXPERIMENT_FILE = "experiment.yaml"


def default_workdir() -> Path:
    return Path(os.environ.get("MLFD_WORKDIR", "mlfd-runs/default"))


@dataclass
class Workspace:
    root: Path
    exp: Experiment
    data_root: str | None = None

    @classmethod
    def open(cls, root: Path, new: Experiment | None = None, data_root: str | None = None,
             ) -> Workspace:
        """Open an existing workspace, or create it from ``new`` when it has none yet."""
        root = Path(root)
        path = root / EXPERIMENT_FILE
        if path.exists():
            exp = Experiment.load(path)
        elif new is not None:
            root.mkdir(parents=True, exist_ok=True)
            new.save(path)
            exp = new
        else:
            raise MlfdError(
                f"{root} has no {EXPERIMENT_FILE}: start one with --preset demo|paper-t1|paper-t2, "
                "--teacher DATASET=ARCH (twice or more) or a --dataset that belongs to a preset"
            )
        exp.validate()
        return cls(root, exp, data_root)

    # --- paths -----------------------------------------------------------------------
    def teacher_dir(self, name: str) -> Path:
        return self.root / "teachers" / name

    def joint_dir(self, levels: int) -> Path:
        return self.root / "joint" / f"L{levels}"

    def student_dir(self, name: str, levels: int) -> Path:
        return self.root / "students" / name / f"L{levels}"

    def teacher_cache(self, levels: int) -> Path:
        return self.root / "cache" / f"teachers-L{levels}.zarr"

    def target_cache(self, levels: int) -> Path:
        return self.root / "cache" / f"targets-L{levels}.zarr"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
