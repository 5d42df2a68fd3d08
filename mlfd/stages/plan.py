"""What `mlfd distill` must run first: the missing or stale upstream stages, in order."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.checkpoint import load_meta
from ..engine.progress import log
from ..workspace import Workspace
from .cache import cache_targets, cache_teachers, check_levels, target_group, teacher_group
from .common import RunOptions
from .distill import distill
from .fuse import fuse, joint_inputs_digest
from .teach import teach, teacher_done


@dataclass
class Step:
    verb: str
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.verb:<8} {self.target:<28} ({self.reason})"


def _joint_status(ws: Workspace, levels: int) -> str | None:
    stem = ws.joint_dir(levels) / "last"
    if not stem.with_suffix(".json").exists():
        return "missing"
    meta = load_meta(stem)
    if not meta.get("complete"):
        return "interrupted"
    if meta.get("inputs_digest") != joint_inputs_digest(ws, levels):
        return "stale: teacher cache changed"
    return None


def plan_distill(ws: Workspace, names: list[str], levels: int, force: bool = False) -> list[Step]:
    """Steps in order; a redone stage makes everything downstream of it stale too."""
    steps: list[Step] = []
    upstream_changed = False
    for e in ws.exp.datasets:
        if not teacher_done(ws, e.name):
            steps.append(Step("teach", e.name, "no finished teacher checkpoint"))
            upstream_changed = True
    bad = [] if upstream_changed else [
        f"{n}/{s}: {st}" for n in ws.exp.names() for s in ("train", "test")
        if (st := teacher_group(ws, levels, n, s).status()) != "ok"]
    if upstream_changed or bad:
        steps.append(Step("cache", f"teacher embeddings L{levels}",
                          "teachers changed" if upstream_changed else bad[0]))
        upstream_changed = True
    joint = "upstream changed" if upstream_changed else _joint_status(ws, levels)
    if joint:
        steps.append(Step("fuse", f"joint teacher L{levels}", joint))
        upstream_changed = True
    need = [n for n in names if upstream_changed or target_group(ws, levels, n).status() != "ok"]
    if need:
        steps.append(Step("cache", f"joint targets L{levels}",
                          "upstream changed" if upstream_changed else "missing or stale") )
    for n in names:
        steps.append(Step("distill", f"{n} L{levels}", "asked for" if not force else "forced"))
    return steps


def run_distill(ws: Workspace, opts: RunOptions, names: list[str], levels: int) -> list[Step]:
    """The one-liner: announce the plan, run each step, return what ran."""
    check_levels(ws, levels)
    steps = plan_distill(ws, names, levels, opts.force)
    log(f"[plan] workspace {ws.root} — {len(steps)} step(s):")
    for i, s in enumerate(steps, 1):
        log(f"  {i}. {s}")
    for s in steps:
        if s.verb == "teach":
            teach(ws, opts, s.target)
        elif s.verb == "cache" and s.target.startswith("teacher"):
            cache_teachers(ws, opts, levels)
        elif s.verb == "fuse":
            fuse(ws, opts, levels)
        elif s.verb == "cache":
            cache_targets(ws, opts, levels, names)
        else:
            distill(ws, opts, s.target.split()[0], levels)
    return steps
