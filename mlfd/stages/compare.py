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

from ..config import Experiment, check_schema
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
# experiment keys that compare sets from its own options, never from --set
OWN_OPTIONS = {"seed": "--seeds", "levels": "--levels", "holdout": "--holdout"}
SET_FORM = "KEY=VALUE (e.g. distill.epochs=4, datasets.NAME.teach.epochs=12, budget=fixed)"


def _value(text: str):
    """JSON first (YAML 1.1 reads 5e-4 as a string), else YAML (bare words, lists)."""
    import json

    import yaml

    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_settings(exp: Experiment, assignments: list[str]) -> Experiment:
    """The experiment with ``--set KEY=VALUE`` values: a dotted path into experiment.yaml
    (``distill.epochs=4``, ``cache.views=2``), where ``datasets.NAME.`` names a dataset's
    entry (``datasets.mnist.teach.epochs=12``, ``datasets.mnist.teach={}``). Each value
    goes through the experiment's schema, so a wrong key or type is one line naming it."""
    if not assignments:
        return exp
    data = exp.to_dict()
    for a in assignments:
        path, sep, text = a.partition("=")
        keys = path.strip().split(".")
        if not sep or "" in keys:
            raise MlfdError(f"--set {a!r}: expected {SET_FORM}")
        if keys[0] in OWN_OPTIONS:
            raise MlfdError(f"--set {path}: set it with {OWN_OPTIONS[keys[0]]}")
        node, where = data, []
        if keys[0] == "datasets":
            if len(keys) < 3:
                raise MlfdError(f"--set {path}: expected datasets.NAME.KEY=VALUE")
            try:
                node = data["datasets"][exp.names().index(exp.entry(keys[1]).name)]
            except MlfdError as e:
                raise MlfdError(f"--set {path}: {e}") from None
            where, keys = keys[:2], keys[2:]
        for k in keys[:-1]:
            where.append(k)
            if not isinstance(node.get(k), dict):
                raise MlfdError(f"--set {path}: {'.'.join(where)} is not a section")
            node = node[k]
        node[keys[-1]] = _value(text)
        try:
            check_schema(data)
        except MlfdError as e:
            raise MlfdError(f"--set {a}: {e}") from None
    new = Experiment.from_dict(data)
    try:
        new.validate()
    except MlfdError as e:
        raise MlfdError(f"--set {' '.join(assignments)}: {e}") from None
    return new


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
