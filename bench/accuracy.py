"""Accuracy over seeds: every model of the paper's comparison, mean ± std, as JSON + Markdown.

For each seed it drives the CLI in its own workdir: `mlfd distill --dataset all` at every
asked level (teachers, caches and joint teachers are shared where the plan allows), the
multi-head and joint-head baselines of every architecture that a student has (so each
student meets baselines of its own architecture), then `mlfd eval`. It writes
bench/results/accuracy-<preset>-<date>.json (per-seed rows, the aggregate, machine,
versions) and the two tables: the paper's Table 2 layout and the Table 4 ablation.

Hyperparameters are the preset's; nothing here looks at the test split to choose them.
A seed's workdir is reused when it exists: finished stages are up to date and skipped,
so running it again after an interruption continues where it stopped.

    python bench/accuracy.py --preset demo --seeds 0 1 2 --levels 1 2
    python bench/accuracy.py --preset trio --data-root ../shared/data --seeds 0 1 2

Seeds run in different sessions merge with --include (same recipe: the experiment but its
seed). A file of another recipe lends only its baselines, and only when what they train on
is unchanged (`baseline_recipe`, the values their stage's own fingerprint checks):

    python bench/accuracy.py --preset trio --seeds --include old.json --include new.json

Choosing a recipe happens on a validation split held out of train, never on the test split:

    python bench/accuracy.py --preset trio --data-root ../shared/data --holdout 0.1 \
        --seeds 0 --no-baselines --tag equal-steps --set datasets.animal-mnist.teach.epochs=12
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("multi-head", "joint-head")


def mlfd(*args, log) -> dict:
    """Run one CLI command (its JSON on stdout), appending its stderr to ``log``."""
    cmd = [sys.executable, "-m", "mlfd_cli.main", *map(str, args), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=dict(os.environ, MLFD_NO_PROGRESS="1"), text=True,
                          capture_output=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, args))}  ({time.perf_counter() - t0:.0f} s)\n")
        f.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"`mlfd {' '.join(map(str, args))}` failed "
                         f"({proc.returncode}): {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout)


def set_value(exp, assignment: str) -> None:
    """Apply one ``--set KEY=VALUE`` to an experiment: ``distill.epochs=4`` or, for one
    dataset's own values, ``datasets.NAME.teach.epochs=12`` (or all of them at once:
    ``datasets.NAME.teach={}``); VALUE is read as JSON, else YAML."""
    import yaml

    path, sep, text = assignment.partition("=")
    if not sep:
        raise SystemExit(f"--set {assignment!r}: expected KEY=VALUE")
    try:  # JSON first: YAML 1.1 reads 5e-4 as a string
        value = json.loads(text)
    except ValueError:
        value = yaml.safe_load(text)
    keys = path.split(".")
    if keys[0] == "datasets":
        if len(keys) not in (3, 4) or keys[2] not in ("teach", "distill") or \
                len(keys) == 3 and not isinstance(value, dict):
            raise SystemExit(f"--set {path}: expected datasets.NAME.teach|distill.KEY=VALUE "
                             "or datasets.NAME.teach|distill={...}")
        entry = exp.entry(keys[1])
        if len(keys) == 3:
            setattr(entry, keys[2], dict(value))
        else:
            getattr(entry, keys[2])[keys[3]] = value
        return
    obj = exp
    for k in keys[:-1]:
        obj = getattr(obj, k)
    if not hasattr(obj, keys[-1]):
        raise SystemExit(f"--set {path}: no such setting")
    setattr(obj, keys[-1], value)


def workdir(args, seed: int) -> tuple[Path, Path]:
    w = args.work / f"{args.name}-seed{seed}"
    return w, args.work / f"{w.name}.log"  # not with_suffix: "holdout0.1" has a dot


def experiment_for(args, seed: int):
    """The experiment a seed runs: the preset, the seed, the holdout, the --set values."""
    from mlfd.presets import get_preset

    exp = get_preset(args.preset)
    exp.seed, exp.levels, exp.holdout = seed, max(args.levels), args.holdout
    for a in args.set:
        set_value(exp, a)
    exp.validate()
    return exp


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe(args) -> str:
    """Digest of everything the seeds share (the experiment but its seed): results files
    made with another recipe (e.g. before a preset changed) are never merged with these."""
    d = experiment_for(args, 0).to_dict()
    d.pop("seed")
    return _digest(d)


def baseline_recipe(args) -> str:
    """Digest of what the baselines' training depends on, but their seed: the values the
    stage's own fingerprint checks (`baseline_spec`) for every baseline run here, and the
    datasets. A recipe change that leaves it equal (e.g. one dataset's own teach epochs)
    leaves an earlier file's baselines valid: `include` takes them."""
    from mlfd.stages.baselines import baseline_spec

    exp = experiment_for(args, 0)
    specs = [baseline_spec(exp, kind, arch, size) for arch, size in archs_of(exp).items()
             for kind in KINDS]
    return _digest({"datasets": [[e.name, e.source] for e in exp.datasets],
                    "holdout": exp.holdout, "baselines": specs})


def archs_of(exp) -> dict[str, int]:
    """Every architecture a student has, with the input size of its first dataset."""
    archs: dict[str, int] = {}
    for e in exp.datasets:
        archs.setdefault(e.arch, e.input_size)
    return archs


def create(args, seed: int) -> None:
    """Write the seed's experiment.yaml (preset, seed, holdout, --set values) where it is
    missing or says otherwise; the stages' own checks then redo only what it changes (so a
    copy of another variant's workdir keeps what the two share)."""
    from mlfd.config import Experiment

    w, _ = workdir(args, seed)
    exp = experiment_for(args, seed)
    path = w / "experiment.yaml"
    if path.exists():
        on_disk = Experiment.load(path)
        exp.cache.uri = on_disk.cache.uri
        if on_disk.to_dict() == exp.to_dict():
            return
    w.mkdir(parents=True, exist_ok=True)
    exp.save(path)


def run_models(args, seed: int, common: list) -> dict:
    """Teachers, joint teachers and students of one seed, at every level."""
    create(args, seed)
    w, log = workdir(args, seed)
    seconds = {}
    for k in args.levels:
        t0 = time.perf_counter()
        datasets = [a for n in args.students for a in ("--dataset", n)]
        mlfd("distill", "--workdir", w, *datasets, "--levels", k, *common, log=log)
        seconds[f"distill-L{k}"] = time.perf_counter() - t0
    return seconds


def run_baselines(args, seed: int, common: list) -> dict:
    """The multi-head and joint-head baselines of every architecture a student has."""
    from mlfd.config import Experiment

    create(args, seed)
    w, log = workdir(args, seed)
    exp = Experiment.load(w / "experiment.yaml")
    seconds = {}
    for arch, size in archs_of(exp).items():
        for kind in KINDS:
            t0 = time.perf_counter()
            mlfd("teach", "--workdir", w, "--baseline", kind, "--arch", arch, "--input-size", size,
                 *common, log=log)
            seconds[f"{kind}-{arch}"] = time.perf_counter() - t0
    return seconds


def evaluate(args, seed: int, common: list) -> list[dict]:
    w, log = workdir(args, seed)
    return mlfd("eval", "--workdir", w, *common, log=log)["rows"]


def key(r: dict) -> tuple:
    """What a row measures, independent of the seed."""
    model = r["model"]
    if model in KINDS:
        return (r["dataset"], f"{model} ({r['arch']})")
    if model in ("joint", "student"):
        return (r["dataset"], f"{model} L{r['levels']}")
    return (r["dataset"], f"teacher ({r['arch']})")


def aggregate(seeds: list[dict]) -> dict:
    """{dataset: {model: {top1_mean, top1_std, top5_mean, top5_std, n_seeds, per_seed}}}."""
    acc: dict = {}
    for s in seeds:
        for r in s["rows"]:
            if r.get("status", "complete") != "complete" or r.get("top1") is None:
                continue  # stale or interrupted results are not numbers of this experiment
            d, m = key(r)
            acc.setdefault(d, {}).setdefault(m, {"top1": [], "top5": []})
            acc[d][m]["top1"].append(100 * r["top1"])
            if r.get("top5") is not None:
                acc[d][m]["top5"].append(100 * r["top5"])
    out = {}
    for d, models in acc.items():
        out[d] = {}
        for m, v in models.items():
            out[d][m] = {"n_seeds": len(v["top1"]), "per_seed_top1": v["top1"]}
            for metric in ("top1", "top5"):
                xs = v[metric]
                out[d][m][f"{metric}_mean"] = statistics.fmean(xs) if xs else None
                out[d][m][f"{metric}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0 \
                    if xs else None
    return out


def _cell(v: dict | None, n_total: int) -> str:
    """mean ± sample std; with the number of seeds when some seeds lack this model."""
    if not v or v["top1_mean"] is None:
        return "—"
    text = f"{v['top1_mean']:.2f} ± {v['top1_std']:.2f}" if v["n_seeds"] > 1 \
        else f"{v['top1_mean']:.2f}"
    return text if v["n_seeds"] == n_total else f"{text} (n={v['n_seeds']})"


def student_arch(seeds: list[dict], dataset: str) -> str:
    return next(r["arch"] for s in seeds for r in s["rows"]
                if r["dataset"] == dataset and r["model"] == "teacher")


def markdown(agg: dict, seeds: list[dict], levels: list[int], split: str = "test") -> str:
    """Table 2 layout (same-architecture baselines per dataset) and the Table 4 ablation."""
    datasets = list(agg)
    where = "the test split" if split == "test" else f"the {split} (not the test split)"
    lines = [f"Top-1 % on {where}, mean ± std over {len(seeds)} seed(s).", "",
             "| model | " + " | ".join(datasets) + " |",
             "|---|" + "---:|" * len(datasets)]
    rows = [("dataset-specific (teacher)", lambda d: agg[d].get(
        f"teacher ({student_arch(seeds, d)})"))]
    for kind in KINDS:
        rows.append((f"{kind} (same arch)", lambda d, kind=kind: agg[d].get(
            f"{kind} ({student_arch(seeds, d)})")))
    for k in levels:
        rows.append((f"MLFD student L{k}", lambda d, k=k: agg[d].get(f"student L{k}")))
    for k in levels:
        rows.append((f"joint teacher L{k}", lambda d, k=k: agg[d].get(f"joint L{k}")))
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(get(d), len(seeds)) for d in datasets)
                     + " |")
    lines += ["", "Ablation (paper Table 4): students by distillation level, top-1 %.", "",
              "| level | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    for k in levels:
        lines.append(f"| L1..L{k} | " + " | ".join(_cell(agg[d].get(f"student L{k}"), len(seeds))
                                                   for d in datasets) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="seeds to run (none: only merge --include files)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--first-complete", action="store_true",
                    help="the first seed's baselines before the other seeds' models")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="measure on this fraction held out of train, not on the test split "
                         "(for choosing a recipe)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change the preset (repeatable): distill.epochs=4, "
                         "datasets.NAME.teach.epochs=12")
    ap.add_argument("--students", nargs="+", default=["all"], metavar="NAME",
                    help="distil only these datasets' students (their teachers, caches and "
                         "joint teacher are all built as always)")
    ap.add_argument("--tag", default="", help="names this variant's workdirs and results")
    ap.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the multi-head and joint-head baselines")
    ap.add_argument("--include", type=Path, action="append", default=[], metavar="JSON",
                    help="take what is not run now from an earlier results file of the "
                         "same preset, levels, holdout and recipe (the experiment but its "
                         "seed), or only its baselines where just their recipe is the same; "
                         "repeatable; a seed's part in several files: the last file's rows")
    args = ap.parse_args()
    args.name = args.preset + (f"-holdout{args.holdout:g}" if args.holdout else "") + \
        (f"-{args.tag}" if args.tag else "")
    common = ["--device", args.device] + (["--data-root", args.data_root] if args.data_root
                                          else [])
    args.work.mkdir(parents=True, exist_ok=True)
    today = dt.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"accuracy-{args.name}-{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seconds: dict[int, dict] = {s: {} for s in args.seeds}
    rows: dict[int, list] = {}
    args.recipe, args.baseline_recipe = recipe(args), baseline_recipe(args)
    args.included, args.included_wall = include(args) if args.include else ([], 0.0)
    if not args.seeds and not args.included:
        raise SystemExit("no --seeds to run and nothing to --include")
    # Students of every seed first, then the baselines: a sweep cut short still has the
    # spread of the method's own numbers. Results are rewritten after every phase.
    if args.first_complete:  # one whole seed first: every comparison has at least one seed
        s0, rest = args.seeds[0], args.seeds[1:]
        phases = ([(s0, "models"), (s0, "baselines")] + [(s, "models") for s in rest]
                  + [(s, "baselines") for s in rest])
    else:
        phases = [(s, "models") for s in args.seeds] + [(s, "baselines") for s in args.seeds]
    if not args.baselines:
        phases = [p for p in phases if p[1] == "models"]
    for seed, phase in phases:
        if phase == "models":
            seconds[seed].update(run_models(args, seed, common))
        else:
            seconds[seed].update(run_baselines(args, seed, common))
        rows[seed] = evaluate(args, seed, common)
        seeds = combine(args.included, [{"seed": s, "rows": rows[s], "seconds": seconds[s]}
                                         for s in args.seeds if s in rows])
        write(out, args, seeds, time.perf_counter() - t0, today)
        print(f"seed {seed} {phase}: done", flush=True)
    if not phases or not args.seeds:
        write(out, args, args.included, 0.0, today)
    print(out.with_suffix(".md").read_text())
    print(f"-> {out}")


def part(name: str) -> str:
    """Which part of a seed a row's model or a stage time belongs to: the method's own
    models (teachers, joint teachers, students) or the baselines, each run and taken apart."""
    return "baselines" if name.startswith(KINDS) else "models"


def runs_now(args, seed: int, which: str) -> bool:
    return seed in args.seeds and (which == "models" or getattr(args, "baselines", True))


def include(args) -> tuple[list[dict], float]:
    """Results of earlier runs for the parts of seeds not run now, and the wall time those
    runs took. A file of the same recipe gives both parts of its seeds; a file of another
    recipe whose baselines' recipe is the same gives only its baselines (their training
    does not depend on what changed). A part in several files: the last file's rows."""
    pieces: dict[tuple[int, str], dict] = {}
    overridden: dict[int, list] = {}
    files: dict[int, list[str]] = {}
    wall = 0.0
    mine = {"preset": args.preset, "levels": args.levels, "holdout": args.holdout}
    for path in args.include:
        doc = json.loads(path.read_text())
        theirs = {"preset": doc["preset"], "levels": doc["levels"],
                  "holdout": doc.get("holdout", 0.0)}
        # files from before recipes were recorded: taken as made with the recipe of now
        same = doc.get("recipe", args.recipe) == args.recipe
        same_baselines = doc.get("baseline_recipe") is not None and \
            doc["baseline_recipe"] == getattr(args, "baseline_recipe", None)
        if mine != theirs or not (same or same_baselines):
            raise SystemExit(f"--include {path}: another experiment "
                             f"({theirs | {'recipe': doc.get('recipe')}} vs "
                             f"{mine | {'recipe': args.recipe}})")
        took = False
        for s in doc["per_seed"]:
            seed, name = s["seed"], s.get("included_from", path.name)
            for which in ("models", "baselines") if same else ("baselines",):
                rows = [r for r in s["rows"] if part(r["model"]) == which]
                if not rows or runs_now(args, seed, which):
                    continue
                old = pieces.get((seed, which))
                if old is not None:  # e.g. a seed resumed to finish: its earlier times kept
                    overridden.setdefault(seed, []).append(old["seconds"])
                seconds = {k: v for k, v in s.get("seconds", {}).items() if part(k) == which}
                pieces[(seed, which)] = {"rows": rows, "seconds": seconds,
                                         "earlier": s.get("earlier_seconds", [])}
                files.setdefault(seed, [])
                files[seed] += [n for n in name.split(", ") if n not in files[seed]]
                took = True
        if not took:
            raise SystemExit(f"--include {path}: no seed there that is not run now")
        wall += doc.get("wall_seconds", 0.0)
    kept = []
    for seed in sorted({seed for seed, _ in pieces}):
        got = {w: pieces[(seed, w)] for w in ("models", "baselines") if (seed, w) in pieces}
        entry = {"seed": seed, "rows": [r for g in got.values() for r in g["rows"]],
                 "seconds": {k: v for g in got.values() for k, v in g["seconds"].items()},
                 "included_from": ", ".join(files[seed]), "parts": list(got)}
        earlier = [e for g in got.values() for e in g["earlier"]] + overridden.get(seed, [])
        if earlier:
            entry["earlier_seconds"] = earlier
        kept.append(entry)
    return kept, wall


def combine(included: list[dict], ran: list[dict]) -> list[dict]:
    """Seeds run now with the included parts of the same seeds (e.g. models run now,
    baselines from an earlier file): an included part replaces that part of the run's rows."""
    by_seed = {s["seed"]: s for s in included}
    out = [s for s in included if s["seed"] not in {r["seed"] for r in ran}]
    for s in ran:
        inc = by_seed.get(s["seed"])
        if inc is not None:
            rows = [r for r in s["rows"] if part(r["model"]) not in inc["parts"]] + inc["rows"]
            s = dict(s, rows=rows, included_from=inc["included_from"],
                     included_parts=inc["parts"])
        out.append(s)
    return sorted(out, key=lambda s: s["seed"])


def write(out: Path, args, seeds: list[dict], wall: float, today: str) -> None:
    import torch
    import zarr

    import mlfd
    from mlfd.info import cpu_model

    agg = aggregate(seeds)
    from mlfd.report import measured_on

    split = measured_on(seeds[0]["rows"]) if seeds else "test"
    table = markdown(agg, seeds, args.levels, split)
    doc = {"preset": args.preset, "date": today, "seeds": [s["seed"] for s in seeds],
           "levels": args.levels, "holdout": args.holdout, "set": args.set, "split": split,
           "recipe": args.recipe, "baseline_recipe": args.baseline_recipe,
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                       else None, "platform": platform.platform()},
           "versions": {"mlfd": mlfd.__version__, "torch": torch.__version__,
                        "zarr": zarr.__version__, "python": platform.python_version()},
           "wall_seconds": wall + args.included_wall, "aggregate": agg, "markdown": table, "per_seed": seeds}
    out.write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text(table)

if __name__ == "__main__":
    main()
