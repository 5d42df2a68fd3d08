"""What `mlfd distill` must run first: the missing, stale or corrupt upstream stages, in order.

Every stage's result carries the fingerprint of what it was made from (its config
section, seed, architecture, input, data and upstream results). A stage is redone when
its result is missing, incomplete, corrupt or stale, and everything downstream of a
redone stage is redone too; the plan names why ("stale: teach.lr 0.002 → 0.001").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.artifact import Artifact
from ..engine.progress import log
from ..workspace import Workspace
from .cache import cache_targets, cache_teachers, check_levels, target_group, teacher_group
from .common import RunOptions
from .distill import distill, student_fingerprint, student_status
from .fuse import fuse, joint_fingerprint, joint_status
from .teach import teach, teacher_fingerprint, teacher_status


@dataclass
class Step:
    verb: str
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.verb:<8} {self.target:<28} ({self.reason})"


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)  # to run, in order
    reused: list[Step] = field(default_factory=list)  # up to date: kept as they are


def _resume_note(art: Artifact, fingerprint: dict, restart: bool) -> str:
    done = 0 if restart else art.resumable_epoch(fingerprint)
    return f"; resumes after epoch {done}" if done else ""


def plan_distill(ws: Workspace, names: list[str], levels: int, force: bool = False,
                 restart: bool = False) -> Plan:
    """Steps in order; a redone stage makes everything downstream of it stale too."""
    plan = Plan()

    def add(verb, target, reason, redo):
        (plan.steps if redo else plan.reused).append(Step(verb, target, reason))

    changed = False
    for e in ws.exp.datasets:
        st = teacher_status(ws, e.name)
        note = "" if st.ok else _resume_note(Artifact(ws.teacher_dir(e.name)),
                                             teacher_fingerprint(ws, e.name), restart)
        add("teach", e.name, st.reason + note, not st.ok)
        changed |= not st.ok
    groups = [teacher_group(ws, levels, n, s) for n in ws.exp.names() for s in ("train", "test")]
    bad = [f"{g.path.parent.name}/{g.path.name}: {g.reason()}" for g in groups
           if g.status() != "ok"] if not changed else []
    add("cache", f"teacher embeddings L{levels}",
        "teachers change" if changed else (bad[0] if bad else "up to date"), changed or bad)
    changed |= bool(bad)
    st = None if changed else joint_status(ws, levels)
    redo = changed or not st.ok
    note = _resume_note(Artifact(ws.joint_dir(levels)), joint_fingerprint(ws, levels), restart) \
        if redo and not changed else ""
    add("fuse", f"joint teacher L{levels}", ("upstream changes" if changed else st.reason) + note,
        redo)
    changed |= redo
    stale = [] if changed else [f"{n}: {target_group(ws, levels, n).reason()}" for n in names
                                if target_group(ws, levels, n).status() != "ok"]
    add("cache", f"joint targets L{levels}",
        "upstream changes" if changed else (stale[0] if stale else "up to date"),
        changed or stale)
    for n in names:
        target = f"{n} L{levels}"
        if changed or stale:
            add("distill", target, "upstream changes", True)
        elif force:
            add("distill", target, "forced", True)
        else:
            st = student_status(ws, n, levels)
            note = "" if st.ok else _resume_note(Artifact(ws.student_dir(n, levels)),
                                                 student_fingerprint(ws, n, levels), restart)
            add("distill", target, st.reason + note, not st.ok)
    return plan


def announce(ws: Workspace, plan: Plan) -> None:
    log(f"[plan] workspace {ws.root} — {len(plan.steps)} step(s) to run, "
        f"{len(plan.reused)} up to date:")
    for s in plan.reused:
        log(f"  =  {s.verb:<8} {s.target:<28} (up to date)")
    for i, s in enumerate(plan.steps, 1):
        log(f"  {i}. {s}")


def run_distill(ws: Workspace, opts: RunOptions, names: list[str], levels: int) -> list[Step]:
    """The one-liner: announce the plan, run each step, return what ran."""
    check_levels(ws, levels)
    plan = plan_distill(ws, names, levels, opts.force, opts.restart)
    announce(ws, plan)
    for s in plan.steps:
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
    return plan.steps
