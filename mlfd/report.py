"""The paper-style comparison: terminal table, JSON, markdown and accuracy-per-epoch plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from .engine.metrics import read_jsonl
from .workspace import Workspace


def _label(r: dict) -> str:
    if r["model"] == "teacher":
        return f"dataset-specific teacher ({r['arch']})"
    if r["model"] in ("multi-head", "joint-head"):
        return f"{r['model']} baseline ({r['arch']})"
    if r["model"] == "joint":
        return f"joint teacher L{r['levels']}"
    if r["model"] == "amalgamated":
        return f"amalgamated student L{r['levels']} ({r['arch']})"
    return f"student L{r['levels']} ({r['arch']})"


def _short_label(r: dict) -> str:
    """The model in a few characters, for the 80-column terminal table (the architecture is
    the dataset's own for teachers and students; baselines name theirs)."""
    if r["model"] in ("joint", "student"):
        return f"{r['model']} L{r['levels']}"
    if r["model"] in ("multi-head", "joint-head"):
        return f"{'MH' if r['model'] == 'multi-head' else 'JH'} {r['arch']}"
    if r["model"] == "amalgamated":
        return f"AM L{r['levels']} {r['arch']}"
    return "teacher"


def _measured(r: dict) -> bool:
    return r.get("top1") is not None and r.get("status", "complete") == "complete"


def _gain(r: dict, rows: list[dict]) -> float | None:
    """A student's top-1 gain over its same-architecture dataset-specific teacher; only
    between complete, up-to-date results."""
    if r["model"] not in ("student", "amalgamated") or not _measured(r):
        return None
    base = [t for t in rows if t["dataset"] == r["dataset"] and t["model"] == "teacher"
            and _measured(t)]
    return r["top1"] - base[0]["top1"] if base else None


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _note(r: dict) -> str:
    """Why a row is not a plain result: stale inputs, or no numbers at all."""
    st = r.get("status", "complete")
    if st == "complete":
        return ""
    if st == "incomplete" and r.get("epochs"):
        return f"incomplete {r.get('epoch')}/{r['epochs']}"
    return st


def _cells(r: dict, rows: list[dict], label=_label) -> list[str]:
    g = _gain(r, rows)
    if r.get("top1") is None:
        return [r["dataset"], label(r), "—", "—", "", _note(r)]
    return [r["dataset"], label(r), _pct(r["top1"]), _pct(r.get("top5")),
            "" if g is None else f"{100 * g:+.2f}", _note(r)]


COLUMNS = ("dataset", "model", "top-1 %", "top-5 %", "vs teacher", "status")


def measured_on(rows: list[dict]) -> str:
    """``test``, or ``holdout F of train`` for rows of a --holdout experiment."""
    return rows[0].get("split", "test") if rows else "test"


def rich_table(rows: list[dict], title: str | None = None) -> Table:
    """At most 80 columns: short model names, no vertical rules, nothing wrapped."""
    from rich import box

    if title is None:
        split = measured_on(rows)
        title = f"MLFD results ({split} split)" if split == "test" else f"MLFD results ({split})"

    caption = "gain: top-1 minus the teacher's"
    if any(r["model"] in ("multi-head", "joint-head") for r in rows):
        caption += "; MH/JH: multi/joint-head baseline"
    if any(r["model"] == "amalgamated" for r in rows):
        caption += "; AM: amalgamated student"
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, padding=(0, 1),
                  collapse_padding=True, pad_edge=False)
    widths = {"dataset": 18, "model": 17, "status": 14}
    for col in ("dataset", "model", "top-1", "top-5", "gain", "status"):
        right = col in ("top-1", "top-5", "gain")
        table.add_column(col, justify="right" if right else "left", no_wrap=True,
                         min_width=6 if right else None, max_width=widths.get(col),
                         overflow="ellipsis")
    for r in rows:
        table.add_row(*_cells(r, rows, _short_label))
    return table


def weaker_joint_lines(rows: list[dict]) -> list[str]:
    """One line per dataset and level where the joint teacher scores below the dataset's
    own teacher on the measured split: a student distilled from it is not the method's
    result without that mark."""
    lines = []
    split = measured_on(rows)
    for t in (r for r in rows if r["model"] == "teacher" and _measured(r)):
        for j in (r for r in rows if r["model"] == "joint" and r["dataset"] == t["dataset"]
                  and _measured(r)):
            if j["top1"] < t["top1"]:
                lines.append(f"{t['dataset']}: the joint teacher L{j['levels']} "
                             f"({_pct(j['top1'])} %) is below {t['dataset']}'s own teacher "
                             f"({_pct(t['top1'])} %) on the {split}: its students are not "
                             "expected to beat the teacher")
    return lines


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(_cells(r, rows)) + " |" for r in rows]
    if notes := weaker_joint_lines(rows):
        lines += [""] + [f"- {n}" for n in notes]
    split = measured_on(rows)
    if split != "test":  # a validation workdir's numbers must not read as test results
        lines = [f"Measured on the {split}, not on the test split.", ""] + lines
    return "\n".join(lines) + "\n"


def plot_curves(ws: Workspace, out_dir: Path) -> list[Path]:
    """One PNG per dataset: test top-1 per epoch of its teacher, the joint teachers, students."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for e in ws.exp.datasets:
        curves = []
        t = read_jsonl(ws.teacher_dir(e.name) / "metrics.jsonl")
        if t:
            curves.append((f"teacher ({e.arch})", [r["epoch"] for r in t], [r["top1"] for r in t]))
        for jd in sorted((ws.root / "joint").glob("L*")):
            j = read_jsonl(jd / "metrics.jsonl")
            if j and f"{e.name}/top1" in j[0]:
                curves.append((f"joint teacher {jd.name}", [r["epoch"] for r in j],
                               [r[f"{e.name}/top1"] for r in j]))
        for sd in sorted((ws.root / "students" / e.name).glob("L*")):
            s = read_jsonl(sd / "metrics.jsonl")
            if s:
                curves.append((f"student {sd.name}", [r["epoch"] for r in s],
                               [r["top1"] for r in s]))
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, x, y in curves:
            ax.plot(x, [100 * v for v in y], marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(e.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"curves-{e.name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(ws: Workspace, rows: list[dict]) -> dict[str, str]:
    out = ws.reports
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.json", json.dumps(rows, indent=2))
    _write_atomic(out / "results.md", markdown(rows))
    plots = plot_curves(ws, out)
    return {"json": str(out / "results.json"), "markdown": str(out / "results.md"),
            "plots": [str(p) for p in plots]}


# --- mlfd compare: mean ± sample std over seeds ------------------------------------------
_ORDER = {"teacher": 0, "multi-head": 1, "joint-head": 2, "joint": 3, "student": 4,
          "amalgamated": 5}


def _key(r: dict) -> tuple:
    return r["dataset"], r["model"], r["arch"], r.get("levels")


def aggregate(per_seed: list[dict], names: list[str], baselines: str = "same-arch") -> list[dict]:
    """One entry per (dataset, model, arch, levels): top-1 of every seed, their mean and
    sample standard deviation (None with one seed). Only complete results count.
    ``baselines`` "same-arch" keeps, for each dataset, the baselines of its own
    architecture (the students'); "all" keeps every baseline."""
    import statistics

    values: dict[tuple, dict[int, float]] = {}
    for doc in per_seed:
        for r in doc["rows"]:
            if _measured(r):
                values.setdefault(_key(r), {})[doc["seed"]] = r["top1"]
    student_arch = {k[0]: k[2] for k in values if k[1] in ("student", "teacher")}
    out = []
    for (dataset, model, arch, levels), by_seed in values.items():
        if baselines == "same-arch" and model in ("multi-head", "joint-head") and \
                student_arch.get(dataset, arch) != arch:
            continue
        v = list(by_seed.values())
        out.append({"dataset": dataset, "model": model, "arch": arch, "levels": levels,
                    "per_seed": by_seed, "n": len(v), "mean": statistics.fmean(v),
                    "std": statistics.stdev(v) if len(v) > 1 else None})
    out.sort(key=lambda a: (names.index(a["dataset"]) if a["dataset"] in names else 99,
                            _ORDER.get(a["model"], 9), a["levels"] or 0, a["arch"]))
    return out


def _mean_std(a: dict) -> str:
    return f"{100 * a['mean']:.2f}" + ("" if a["std"] is None else f" ± {100 * a['std']:.2f}")


def spread_verdicts(agg: list[dict]) -> list[str]:
    """For every student: against its teacher and its same-architecture baselines, whether
    the difference of the means exceeds the spread (|difference| > the sum of the two
    sample stds) or is within it; with one seed there is no spread to say."""
    lines = []
    for s in (a for a in agg if a["model"] == "student"):
        others = [a for a in agg if a["dataset"] == s["dataset"] and (
            a["model"] == "teacher" or a["model"] in ("multi-head", "joint-head")
            and a["arch"] == s["arch"])]
        for o in others:
            diff = s["mean"] - o["mean"]
            if s["std"] is None or o["std"] is None:
                verdict = "one seed: no spread"
            else:
                spread = s["std"] + o["std"]
                verdict = ("exceeds the spread" if abs(diff) > spread else "within the spread")
                verdict += f" ({100 * spread:.2f})"
            what = "teacher" if o["model"] == "teacher" else f"{o['model']} {o['arch']}"
            lines.append(f"{s['dataset']}: student L{s['levels']} vs {what}: "
                         f"{100 * diff:+.2f} points, {verdict}")
    return lines


def compare_markdown(agg: list[dict], seeds: list[int], notes: list[str], split: str,
                     machine: str = "") -> str:
    head = ["| dataset | model | top-1 % (mean ± std) | " +
            " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|---|---:|" + "---:|" * len(seeds)]
    body = []
    for a in agg:
        cells = [f"{100 * a['per_seed'][s]:.2f}" if s in a["per_seed"] else "—" for s in seeds]
        body.append(f"| {a['dataset']} | {_label(a)} | {_mean_std(a)} | " + " | ".join(cells)
                    + " |")
    lines = [f"Top-1 on the {split}, mean ± sample std over seeds {seeds}"
             + (f"; {machine}" if machine else "") + ".", "", *head, *body, ""]
    verdicts = spread_verdicts(agg)
    if verdicts:
        lines += ["Differences against the spread (sum of the two sample stds):", ""]
        lines += [f"- {v}" for v in verdicts] + [""]
    if notes:
        lines += ["Where the method cannot help (joint teacher below the dataset's teacher):",
                  ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def compare_table(agg: list[dict], seeds: list[int], title: str) -> Table:
    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True,
                  pad_edge=False)
    table.add_column("dataset", max_width=16, overflow="ellipsis", no_wrap=True)
    table.add_column("model", max_width=17, overflow="ellipsis", no_wrap=True)
    table.add_column("mean ± std", justify="right", no_wrap=True)
    for s in seeds:
        table.add_column(f"s{s}", justify="right", no_wrap=True)
    for a in agg:
        table.add_row(a["dataset"], _short_label(a), _mean_std(a),
                      *(f"{100 * a['per_seed'][s]:.1f}" if s in a["per_seed"] else "—"
                        for s in seeds))
    return table


def plot_compare(agg: list[dict], path: Path) -> Path:
    """Grouped bars per dataset with sample-std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(a["dataset"] for a in agg))
    labels = list(dict.fromkeys(_short_label(a) for a in agg))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(datasets) * max(1, len(labels)) / 3), 4),
                           dpi=100)
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        xs, ys, es = [], [], []
        for i, d in enumerate(datasets):
            a = next((a for a in agg if a["dataset"] == d and _short_label(a) == label), None)
            if a is not None:
                xs.append(i + (j - (len(labels) - 1) / 2) * width)
                ys.append(100 * a["mean"])
                es.append(100 * (a["std"] or 0.0))
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=label)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("top-1 (%), mean ± sample std")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_compare(out: Path, per_seed: list[dict], names: list[str], levels: list[int],
                  baselines: str, machine: str = "") -> dict:
    """reports/compare.{json,md,png} under ``out``; returns the document written."""
    seeds = [d["seed"] for d in per_seed]
    agg = aggregate(per_seed, names, baselines)
    notes = [f"seed {d['seed']}: {n}" for d in per_seed for n in d.get("notes", [])]
    split = measured_on([r for d in per_seed for r in d["rows"]])
    doc = {"seeds": seeds, "levels": levels, "baselines": baselines, "split": split,
           "machine": machine, "aggregate": agg, "verdicts": spread_verdicts(agg),
           "notes": notes, "per_seed": per_seed}
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "compare.json", json.dumps(doc, indent=2, default=str))
    _write_atomic(out / "compare.md", compare_markdown(agg, seeds, notes, split, machine))
    plot_compare(agg, out / "compare.png")
    return {**doc, "reports": {"json": str(out / "compare.json"),
                               "markdown": str(out / "compare.md"),
                               "plot": str(out / "compare.png")}}
