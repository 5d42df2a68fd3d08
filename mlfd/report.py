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
    return f"student L{r['levels']} ({r['arch']})"


def _short_label(r: dict) -> str:
    """The model in a few characters, for the 80-column terminal table (the architecture is
    the dataset's own for teachers and students; baselines name theirs)."""
    if r["model"] in ("joint", "student"):
        return f"{r['model']} L{r['levels']}"
    if r["model"] in ("multi-head", "joint-head"):
        return f"{'MH' if r['model'] == 'multi-head' else 'JH'} {r['arch']}"
    return "teacher"


def _measured(r: dict) -> bool:
    return r.get("top1") is not None and r.get("status", "complete") == "complete"


def _gain(r: dict, rows: list[dict]) -> float | None:
    """A student's top-1 gain over its same-architecture dataset-specific teacher; only
    between complete, up-to-date results."""
    if r["model"] != "student" or not _measured(r):
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


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(_cells(r, rows)) + " |" for r in rows]
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
