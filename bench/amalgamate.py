"""One amalgamated student for all datasets (issue 18 §1) against the per-dataset students,
the multi-head baseline of the same architecture and the joint teacher, on the demo.

    python bench/amalgamate.py run --source /tmp/ha/runs --root /tmp/amal --seeds 0 1 2
    python bench/amalgamate.py report --root /tmp/amal --seeds 0 1 2

`run`, per seed, one after another: copies the finished demo workdir
<source>/s<seed>-float16 (teachers, joint teachers and per-dataset students at L1 and
L2, caches built) to <root>/s<seed> (the source is not touched), then in the copy
`mlfd distill --amalgamate ARCH --levels 1`, `--levels 2`, `mlfd teach --baseline
multi-head --arch ARCH` and `mlfd eval --json` (> eval.json). Each command reuses what is
up to date, so `run` continues an interrupted seed.

`report` reads each seed's eval.json: per dataset, top-1 mean ± sample std over the
seeds with the per-seed values of the amalgamated student (L1, L2), the per-dataset
students (L1, L2), the multi-head baseline and the joint teacher (L1, L2); then, on the
first seed's models, parameters and CPU latency (one thread, batch 1 and 64, median of
repeats taken in interleaved rounds) of the one amalgamated student against the N
per-dataset students together (one batch of every dataset: the amalgamated student runs its backbone and that
dataset's head per batch). Writes bench/results/amalgamate-demo-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = "test_convnext"
MODELS = [("amalgamated", 1), ("amalgamated", 2), ("student", 1), ("student", 2),
          ("multi-head", None), ("joint", 1), ("joint", 2), ("teacher", None)]


def _mlfd(work: Path, name: str, *args: str) -> int:
    cmd = [sys.executable, "-m", "mlfd_cli.main", *args, "--workdir", str(work), "--json"]
    with open(work / f"{name}.json", "w") as out, open(work / f"{name}.log", "w") as log:
        return subprocess.run(cmd, stdout=out, stderr=log, cwd=ROOT,
                              env=dict(os.environ, MLFD_NO_PROGRESS="1")).returncode


def run(source: Path, root: Path, seeds: list[int], arch: str) -> None:
    for seed in seeds:
        work = root / f"s{seed}"
        if not work.is_dir():
            shutil.copytree(source / f"s{seed}-float16", work, symlinks=True)
            (work / ".mlfd.lock").unlink(missing_ok=True)
        steps = [(f"amalgamate-L{k}", ["distill", "--amalgamate", arch, "--levels", str(k)])
                 for k in (1, 2)]
        steps += [("multi-head", ["teach", "--baseline", "multi-head", "--arch", arch]),
                  ("eval", ["eval"])]
        for name, args in steps:
            if _mlfd(work, name, *args):
                raise SystemExit(f"seed {seed}: {' '.join(args)} failed: see {work}/{name}.log")


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def accuracy(root: Path, seeds: list[int], arch: str) -> tuple[list[str], list[dict]]:
    """Per (dataset, model, level): top-1 of every seed, mean and sample std."""
    per_seed = {s: json.loads((root / f"s{s}" / "eval.json").read_text())["rows"] for s in seeds}
    names = list(dict.fromkeys(r["dataset"] for r in per_seed[seeds[0]]))
    out = []
    for name in names:
        for model, k in MODELS:
            values = {}
            for s, rows in per_seed.items():
                for r in rows:
                    if (r["dataset"], r["model"], r["levels"]) == (name, model, k) and \
                            r["status"] == "complete" and r["top1"] is not None and \
                            (model not in ("multi-head", "amalgamated") or r["arch"] == arch):
                        values[str(s)] = r["top1"]
            arch_of = next((r["arch"] for r in per_seed[seeds[0]] if r["dataset"] == name
                            and r["model"] == model), None)
            out.append({"dataset": name, "model": model, "levels": k, "arch": arch_of,
                        "per_seed": values, **_spread(list(values.values()))})
    return names, out


def verdicts(rows: list[dict]) -> list[str]:
    """Amalgamated L_k against the per-dataset student L_k, the multi-head baseline and the
    joint teacher L_k: the difference of the means, and whether it exceeds the spread
    (the larger of the two sample stds)."""
    def get(d, m, k):
        return next((r for r in rows if (r["dataset"], r["model"], r["levels"]) == (d, m, k)),
                    None)

    lines = []
    for r in (x for x in rows if x["model"] == "amalgamated" and x["mean"] is not None):
        for other, k in (("student", r["levels"]), ("multi-head", None), ("joint", r["levels"])):
            o = get(r["dataset"], other, k)
            if o is None or o["mean"] is None:
                continue
            diff = r["mean"] - o["mean"]
            spread = max(x or 0.0 for x in (r["std"], o["std"]))
            word = ("wins" if diff > 0 else "loses") if abs(diff) > spread else "ties"
            what = f"{other} L{k}" if k else f"{other} {ARCH}"
            lines.append(f"{r['dataset']}: amalgamated L{r['levels']} {word} against {what}: "
                         f"{100 * diff:+.2f} points (spread {100 * spread:.2f})")
    return lines


def _medians_ms(calls: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each call, in interleaved rounds (one call of each per round), so
    that load from other processes on a shared machine falls on all of them alike."""
    import torch

    times = {k: [] for k in calls}
    with torch.inference_mode():
        for _ in range(3):
            for fn in calls.values():
                fn()
        for _ in range(repeats):
            for k, fn in calls.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def cost(work: Path, arch: str, levels: int = 2) -> dict:
    """Parameters and CPU latency of the amalgamated student vs the per-dataset students."""
    import torch

    from mlfd.engine.checkpoint import load_meta
    from mlfd.stages.amalgamate import amalgam_dir, load_amalgam
    from mlfd.stages.evaluate import load_student
    from mlfd.workspace import Workspace

    torch.set_num_threads(1)
    ws = Workspace.open(work)
    stem = amalgam_dir(ws, arch, levels) / "last"
    net = load_amalgam(stem, load_meta(stem), torch.device("cpu"))
    names = ws.exp.names()
    students = {n: load_student(ws, n, levels, torch.device("cpu")) for n in names}
    size = load_meta(stem)["input_size"]
    doc = {"levels": levels, "input_size": size, "threads": 1,
           "amalgamated": {"arch": arch, "params": sum(p.numel() for p in net.parameters()),
                           "backbone_params": sum(p.numel() for p in net.backbone.parameters())},
           "students": {n: {"arch": ws.exp.entry(n).arch,
                            "params": sum(p.numel() for p in m.parameters())}
                        for n, m in students.items()},
           "latency_ms": {}}
    doc["students_params_total"] = sum(s["params"] for s in doc["students"].values())
    for batch, repeats in ((1, 200), (64, 30)):
        x = torch.randn(batch, 3, size, size)
        xs = {n: torch.randn(batch, 3, ws.exp.entry(n).input_size, ws.exp.entry(n).input_size)
              for n in names}
        calls = {("am", n): (lambda d=d, x=x: net(x, d)) for d, n in enumerate(names)}
        calls.update({("st", n): (lambda n=n, xs=xs: students[n](xs[n])) for n in names})
        ms = _medians_ms(calls, repeats)
        am = {n: ms[("am", n)] for n in names}
        st = {n: ms[("st", n)] for n in names}
        doc["latency_ms"][str(batch)] = {
            "amalgamated": am, "students": st, "amalgamated_total": sum(am.values()),
            "students_total": sum(st.values()), "repeats": repeats}
    return doc


def _cell(r: dict) -> str:
    if r["mean"] is None:
        return "—"
    std = "" if r["std"] is None else f" ± {100 * r['std']:.2f}"
    return f"{100 * r['mean']:.2f}{std}"


def markdown(doc: dict) -> str:
    seeds = [str(s) for s in doc["seeds"]]
    label = {"amalgamated": "amalgamated student", "student": "per-dataset student",
             "multi-head": "multi-head baseline", "joint": "joint teacher",
             "teacher": "dataset-specific teacher"}
    lines = [f"# Amalgamated student ({doc['arch']}) on the demo preset, seeds "
             f"{', '.join(seeds)}", "",
             f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores (shared, busy); "
             f"torch {doc['versions']['torch']}, timm {doc['versions']['timm']}. "
             f"{doc['date'][:10]}.", "", f"Command: `{doc['command']}`", "",
             "Test top-1 % (mean ± sample std over the seeds, then each seed):", "",
             "| dataset | model | arch | top-1 % | " + " | ".join(f"seed {s}" for s in seeds)
             + " |", "|---|---|---|---|" + "---|" * len(seeds)]
    for r in doc["rows"]:
        lvl = f" L{r['levels']}" if r["levels"] else ""
        cells = [f"{100 * r['per_seed'][s]:.2f}" if s in r["per_seed"] else "—" for s in seeds]
        lines.append(f"| {r['dataset']} | {label[r['model']]}{lvl} | {r['arch']} | "
                     f"{_cell(r)} | " + " | ".join(cells) + " |")
    c = doc["cost"]
    lines += ["", "Where the amalgamated student wins and loses (difference of the means; a "
              "difference within the larger std is a tie):", ""]
    lines += [f"- {v}" for v in doc["verdicts"]]
    lines += ["", f"Size and CPU latency (L{c['levels']} models of seed {doc['seeds'][0]}, "
              f"{c['input_size']} px, {c['threads']} thread, median; one batch of every "
              "dataset):", "",
              "| | parameters | batch 1 (ms) | batch 64 (ms) |", "|---|---|---|---|"]
    lat = c["latency_ms"]
    lines.append(f"| one amalgamated {doc['arch']} (backbone + {len(c['students'])} heads) | "
                 f"{c['amalgamated']['params']:,} | {lat['1']['amalgamated_total']:.2f} | "
                 f"{lat['64']['amalgamated_total']:.1f} |")
    archs = ", ".join(s["arch"] for s in c["students"].values())
    lines.append(f"| {len(c['students'])} per-dataset students together ({archs}) | "
                 f"{c['students_params_total']:,} | {lat['1']['students_total']:.2f} | "
                 f"{lat['64']['students_total']:.1f} |")
    for n, s in c["students"].items():
        lines.append(f"| — student {n} ({s['arch']}) | {s['params']:,} | "
                     f"{lat['1']['students'][n]:.2f} | {lat['64']['students'][n]:.1f} |")
    if doc.get("note"):
        lines += ["", doc["note"]]
    return "\n".join(lines) + "\n"


def report(root: Path, seeds: list[int], arch: str, out: Path | None, note: str,
           command: str) -> None:
    import timm
    import torch

    import mlfd
    from mlfd.info import cpu_model

    names, rows = accuracy(root, seeds, arch)
    doc = {"bench": "amalgamate", "preset": "demo", "arch": arch, "seeds": seeds,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": command,
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                       "platform": platform.platform()},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "timm": timm.__version__, "mlfd": mlfd.__version__},
           "datasets": names, "rows": rows, "verdicts": verdicts(rows),
           "cost": cost(root / f"s{seeds[0]}", arch), "note": note}
    out = out or ROOT / "bench" / "results" / f"amalgamate-demo-{doc['date'][:10]}"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--source", type=Path, required=True)
    rep = sub.add_parser("report")
    rep.add_argument("--out", type=Path, default=None, help="path without suffix")
    rep.add_argument("--note", default="")
    for a in (r, rep):
        a.add_argument("--root", type=Path, required=True)
        a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        a.add_argument("--arch", default=ARCH)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.source, args.root, args.seeds, args.arch)
    else:
        report(args.root, args.seeds, args.arch, args.out, args.note,
               f"python bench/amalgamate.py run --source /tmp/ha/runs --root {args.root} "
               f"--seeds {' '.join(map(str, args.seeds))}")


if __name__ == "__main__":
    main()
