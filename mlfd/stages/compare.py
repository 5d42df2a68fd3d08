"""Stage `compare`: the evidence protocol on the current experiment, over seeds.

For every seed it runs, in its own workdir under the experiment's
(``<workdir>/compare/seed-N``), what the paper's comparison needs: the teachers, at every
asked level the joint teacher and the students (`run_distill`), the multi-head and
joint-head baselines of every architecture a student has, then `evaluate`. Each seed's
workdir is an ordinary one: finished stages are up to date and reused, so running it
again after an interruption (or with more seeds) continues where it stopped.
"""

from __future__ import annotations

import copy

from ..engine.distributed import barrier
from ..engine.progress import log
from ..errors import MlfdError
from ..storage.uri import join
from ..workspace import Workspace
from .baselines import KINDS, train_baseline
from .common import RunOptions, weaker_joint
from .evaluate import evaluate
from .plan import plan_baseline, run_distill

BASELINES = ("same-arch", "all", "none")


def seed_root(ws: Workspace, seed: int):
    return ws.root / "compare" / f"seed-{seed}"


def seed_workspace(ws: Workspace, seed: int) -> Workspace:
    """The experiment with ``seed``, in its own workdir; its experiment.yaml is rewritten
    from the current one each run, so the seeds always follow the experiment."""
    exp = copy.deepcopy(ws.exp)
    exp.budget_hook = None  # bound to the parent workspace: the seed gets its own
    exp.seed = seed
    if exp.cache.uri:  # each seed its own caches, wherever the experiment keeps them
        exp.cache.uri = join(exp.cache.uri, f"compare/seed-{seed}")
    return Workspace(seed_root(ws, seed), exp, ws.data_root, is_new=True)


def archs_of(ws: Workspace) -> dict[str, int]:
    """Every architecture a student has, with the input size of its first dataset."""
    out: dict[str, int] = {}
    for e in ws.exp.datasets:
        out.setdefault(e.arch, e.input_size)
    return out


def run_seed(ws: Workspace, opts: RunOptions, levels: list[int], baselines: str,
             skip_bad_images: bool = False) -> dict:
    """One seed's models, trained or reused, and its evaluation rows."""
    names = ws.exp.names()
    with ws.locked():
        ws.create()
        for k in levels:
            run_distill(ws, opts, names, k, skip_bad_images)
        if baselines != "none":
            for arch, size in archs_of(ws).items():
                for kind in KINDS:
                    plan = plan_baseline(ws, kind, arch, size, opts.force, opts.restart)
                    for s in plan.steps:
                        log(f"[compare] seed {ws.exp.seed}: {s.target}: {s.reason}")
                        train_baseline(ws, opts, kind, arch, size)
                    barrier()
        rows = evaluate(ws, opts)
    notes = [line for k in levels for line in weaker_joint(ws, k, names)]
    return {"seed": ws.exp.seed, "workdir": str(ws.root), "rows": rows, "notes": notes}


def compare(ws: Workspace, opts: RunOptions, seeds: list[int], levels: list[int],
            baselines: str = "same-arch", skip_bad_images: bool = False) -> list[dict]:
    """Every seed in turn (each resumable); returns the per-seed results."""
    if baselines not in BASELINES:
        raise MlfdError(f"--baselines {baselines!r}: choose {', '.join(BASELINES)}")
    if not seeds:
        raise MlfdError("compare needs at least one --seeds value")
    if len(set(seeds)) != len(seeds):
        raise MlfdError(f"--seeds must differ, got {seeds}")
    out = []
    for i, seed in enumerate(seeds, 1):
        sws = seed_workspace(ws, seed)
        log(f"[compare] seed {seed} ({i}/{len(seeds)}) in {sws.root}")
        out.append(run_seed(sws, opts, sorted(set(levels)), baselines, skip_bad_images))
    return out
