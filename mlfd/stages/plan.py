"""What `mlfd distill` must run first: the missing, stale or corrupt upstream stages, in order.

Every stage's result carries the fingerprint of what it was made from (its config
section, seed, architecture, input, data and upstream results). A stage is redone when
its result is missing, incomplete, corrupt or stale, and everything downstream of a
redone stage is redone too; the plan names why ("stale: teach.lr 0.002 → 0.001").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..engine.artifact import Artifact
from ..engine.budget import rule_of
from ..engine.distributed import barrier, on_main
from ..engine.progress import log
from ..workspace import Workspace
from .amalgamate import amalgam_dir, amalgam_fingerprint, check_arch, input_size
from .amalgamate import amalgamate as amalgamate_stage
from .baselines import baseline_dir, baseline_fingerprint
from .cache import SPLITS, cache_teachers, check_levels, teacher_group
from .common import RunOptions, dataset_of, model_budget, weaker_joint
from .distill import cache_budget, distill, student_fingerprint
from .fuse import fuse, joint_fingerprint, joint_status
from .scan import has_files, recorded, scan
from .targets import cache_targets, target_group
from .teach import teach, teacher_fingerprint


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
    # The image scans that come before anything else (see stages.scan): a run scans before
    # it plans, so a plan only reports them.
    scans: list[Step] = field(default_factory=list)
    # How long each model that the plan trains or keeps trains: one line per model.
    budgets: list[str] = field(default_factory=list)
    # One line per dataset whose joint teacher is below its own teacher (weaker_joint).
    notes: list[str] = field(default_factory=list)


def plan_scan(ws: Workspace, names: list[str]) -> list[Step]:
    """What the scan found (from the workdir's record) or will decode, for each dataset of
    image files among ``names``; a recorded skip is applied to the dataset first, as a run
    applies it, so the fingerprints planned from it are the run's. Reads, decodes nothing."""
    steps = []
    for n in dict.fromkeys(names):
        ds = dataset_of(ws, n)
        if not has_files(ds):
            continue
        reason = recorded(ws, n) or (
            f"not scanned yet: {sum(len(ds.load_all(s)) for s in ds.splits())} images "
            "to decode before anything runs")
        steps.append(Step("scan", n, reason))
    return steps


def budget_lines(ws: Workspace, names: list[str], sections=("teach", "distill")) -> list[str]:
    """Each dataset-specific model's budget in epochs, steps and images (none while its
    data is only planned for)."""
    lines = []
    rule = rule_of(ws.exp)
    for section in sections:
        for n in names:
            b = model_budget(ws, section, n)
            if b is not None:
                who = "teacher" if section == "teach" else "student"
                lines.append(f"{who} {n}: {b.line()}")
    if lines:
        lines.insert(0, f"budget rule {rule!r} (experiment.yaml: budget)")
    return lines


def _resume_note(art: Artifact, fingerprint: dict, restart: bool) -> str:
    done = 0 if restart else art.resumable_epoch(fingerprint)
    return f"; resumes after epoch {done}" if done else ""


def _trained(plan: Plan, verb: str, target: str, art: Artifact, fingerprint: dict,
             force: bool, restart: bool) -> bool:
    """Add a trained result to ``plan``: reused if up to date (and not forced), else a step
    saying why; True if it runs."""
    st = art.status(fingerprint)
    if st.ok and not force:
        plan.reused.append(Step(verb, target, st.reason))
        return False
    reason = "forced" if st.ok else st.reason
    plan.steps.append(Step(verb, target, reason + _resume_note(art, fingerprint, restart)))
    return True


def plan_teach(ws: Workspace, names: list[str], force: bool = False,
               restart: bool = False) -> Plan:
    """The teachers `mlfd teach` trains: missing, incomplete, corrupt or stale ones."""
    plan = Plan(scans=plan_scan(ws, names), budgets=budget_lines(ws, names, ("teach",)))
    for n in names:
        _trained(plan, "teach", n, Artifact(ws.teacher_dir(n)), teacher_fingerprint(ws, n),
                 force, restart)
    return plan


def plan_baseline(ws: Workspace, kind: str, arch: str | None, size: int | None,
                  force: bool = False, restart: bool = False) -> Plan:
    """`mlfd teach --baseline`: trained unless an up-to-date one exists (or --force)."""
    arch, size = arch or ws.exp.datasets[0].arch, size or ws.exp.datasets[0].input_size
    plan = Plan(scans=plan_scan(ws, ws.exp.names()))
    art, fp = Artifact(baseline_dir(ws, kind, arch)), baseline_fingerprint(ws, kind, arch, size)
    _trained(plan, "teach", f"{kind} baseline {arch}", art, fp, force, restart)
    return plan


def plan_fuse(ws: Workspace, levels: int, force: bool = False, restart: bool = False) -> Plan:
    plan = Plan(scans=plan_scan(ws, ws.exp.names()))
    _trained(plan, "fuse", f"joint teacher L{levels}", Artifact(ws.joint_dir(levels)),
             joint_fingerprint(ws, levels), force, restart)
    return plan


def plan_cache(ws: Workspace, levels: int, force: bool = False) -> Plan:
    """The groups `mlfd cache` (re)writes: every teacher-embedding group, then the joint
    targets if the joint teacher is up to date."""
    scans = plan_scan(ws, ws.exp.names())
    groups = [(f"teachers L{levels} {n}/{s}", teacher_group(ws, levels, n, s))
              for n in ws.exp.names() for s in SPLITS]
    if joint_status(ws, levels).ok:
        groups += [(f"targets L{levels} {n}", target_group(ws, levels, n))
                   for n in ws.exp.names()]
    plan = Plan(scans=scans)
    for target, g in groups:
        why = g.reason()  # 'ok' exactly when the group is complete, current and intact
        if why == "ok" and not force:
            plan.reused.append(Step("cache", target, "up to date"))
        else:
            plan.steps.append(Step("cache", target, "forced" if why == "ok" else why))
    return plan


def plan_distill(ws: Workspace, names: list[str], levels: int, force: bool = False,
                 restart: bool = False, budget: int | None = None,
                 amalgamate: str | None = None) -> Plan:
    """Steps in order; a redone stage makes everything downstream of it stale too.
    ``budget``: the run's target-cache memory (distill.cache_budget), which decides how a
    student is fed its targets, hence its fingerprint. ``amalgamate``: an architecture;
    then one amalgamated student of it over all datasets is the last step, instead of the
    students of ``names``."""
    if amalgamate:
        names = ws.exp.names()  # the amalgamated student learns from every dataset's targets
        check_arch(amalgamate)
    plan = Plan(scans=plan_scan(ws, ws.exp.names()),
                budgets=budget_lines(ws, names, ("teach",) if amalgamate else
                                     ("teach", "distill")))

    def add(verb, target, reason, redo):
        (plan.steps if redo else plan.reused).append(Step(verb, target, reason))

    def merge(sub: Plan) -> bool:
        plan.steps.extend(sub.steps)
        plan.reused.extend(sub.reused)
        return bool(sub.steps)

    changed = merge(plan_teach(ws, ws.exp.names(), restart=restart))
    groups = [teacher_group(ws, levels, n, s) for n in ws.exp.names() for s in SPLITS]
    # reason() is "ok" exactly when status() is: one integrity read per group, not two
    bad = [f"{g.path.parent.name}/{g.path.name}: {why}" for g in groups
           if (why := g.reason()) != "ok"] if not changed else []
    add("cache", f"teacher embeddings L{levels}",
        "teachers change" if changed else (bad[0] if bad else "up to date"), changed or bad)
    # A rebuilt cache group gets the fingerprint the experiment asks for now, and everything
    # downstream is judged by fingerprints: a missing or damaged group is rebuilt without
    # retraining what was made from an identical one (a stale group changes the fingerprints
    # downstream, so those stages come out stale on their own).
    if changed:
        add("fuse", f"joint teacher L{levels}", "upstream changes", True)
    else:
        changed = merge(plan_fuse(ws, levels, restart=restart))
    stale = [] if changed else [f"{n}: {why}" for n in names
                                if (why := target_group(ws, levels, n).reason()) != "ok"]
    add("cache", f"joint targets L{levels}",
        "upstream changes" if changed else (stale[0] if stale else "up to date"),
        changed or stale)
    if not changed:  # the joint teacher that the students will learn from is known now
        plan.notes = weaker_joint(ws, levels, names)
    if amalgamate:
        target = f"amalgamated {amalgamate} L{levels}"
        cfg = ws.exp.stage("distill")
        plan.budgets.append(f"amalgamated student {amalgamate}: {cfg.epochs} epochs over the "
                            f"union of the datasets, batch {cfg.micro_batch}, input "
                            f"{input_size(ws)}px (the largest)")
        if changed:
            add("distill", target, "upstream changes", True)
        else:
            _trained(plan, "distill", target, Artifact(amalgam_dir(ws, amalgamate, levels)),
                     amalgam_fingerprint(ws, amalgamate, levels), force, restart)
        return plan
    for n in names:
        target = f"{n} L{levels}"
        if changed:
            add("distill", target, "upstream changes", True)
        else:
            _trained(plan, "distill", target, Artifact(ws.student_dir(n, levels)),
                     student_fingerprint(ws, n, levels, budget), force, restart)
    return plan


def announce(ws: Workspace, plan: Plan, write=log) -> None:
    write(f"[plan] workspace {ws.root} — {len(plan.steps)} step(s) to run, "
          f"{len(plan.reused)} up to date:")
    for s in plan.scans:
        write(f"  -  {s.verb:<8} {s.target:<28} ({s.reason})")
    for s in plan.reused:
        write(f"  =  {s.verb:<8} {s.target:<28} (up to date)")
    for i, s in enumerate(plan.steps, 1):
        write(f"  {i}. {s}")
    for line in plan.budgets:
        write(f"[plan] {line}")
    for line in plan.notes:
        write(f"[plan] {line}")
    for e in ws.exp.datasets:  # set only where a dry run left the data to a real run
        if note := dataset_of(ws, e.name).pending:
            write(f"[plan] data: {note}")


def run_distill(ws: Workspace, opts: RunOptions, names: list[str], levels: int,
                skip_bad_images: bool = False, amalgamate: str | None = None) -> list[Step]:
    """The one-liner: scan the images, announce the plan, run each step, return what ran
    (``amalgamate``: an architecture, see plan_distill)."""
    check_levels(ws, levels)
    scan(ws, ws.exp.names(), skip_bad_images)  # before planning: skipped rows change fingerprints
    # one budget for the plan and every student: free memory is read once (by rank 0
    # under torchrun: it decides the students' fingerprints, which all ranks must share)
    opts = dataclasses.replace(opts, cache_memory=on_main(cache_budget, opts))
    # Under torchrun rank 0 plans (reading state only it may change) and tells the others.
    plan = on_main(plan_distill, ws, names, levels, opts.force, opts.restart, opts.cache_memory,
                   amalgamate)
    announce(ws, plan)
    warned = bool(plan.notes)
    for s in plan.steps:
        if s.verb == "distill" and not warned:  # the joint teacher is trained by now
            warned = True
            for line in on_main(weaker_joint, ws, levels, names):
                log(f"[plan] {line}")
        if s.verb == "teach":
            teach(ws, opts, s.target)
        elif s.verb == "cache" and s.target.startswith("teacher"):
            cache_teachers(ws, opts, levels)  # every rank extracts its own rows
        elif s.verb == "fuse":
            fuse(ws, opts, levels)
        elif s.verb == "cache":
            cache_targets(ws, opts, levels, ws.exp.names() if amalgamate else names)
        elif amalgamate:
            amalgamate_stage(ws, opts, amalgamate, levels)
        else:
            distill(ws, opts, s.target.split()[0], levels)
        barrier()  # what rank 0 wrote is there before any rank reads it in the next step
    return plan.steps
