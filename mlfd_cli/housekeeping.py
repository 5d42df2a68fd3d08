"""list, clean and info: what a workdir holds, removing what can be rebuilt, and the
environment."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from mlfd.errors import MlfdError
from mlfd_cli import session
from mlfd_cli.app import (
    DataRoot,
    Json,
    Workdir,
    command,
)

STATE_WORDS = {"ok": "complete"}


def _stage_rows(ws) -> list[dict]:
    """Status of every stage's results, read-only: teachers, joint L*, students, amalgamated
    students, baselines."""
    from mlfd.engine.artifact import Artifact
    from mlfd.engine.checkpoint import load_meta_safe
    from mlfd.stages.amalgamate import amalgam_archs, amalgam_dir, amalgam_fingerprint, amalgam_name
    from mlfd.stages.baselines import baseline_fingerprint
    from mlfd.stages.common import trained_levels
    from mlfd.stages.distill import student_fingerprint
    from mlfd.stages.fuse import joint_fingerprint
    from mlfd.stages.scan import recorded
    from mlfd.stages.teach import teacher_fingerprint

    for name in ws.exp.names():  # a run's accepted skip of bad images is part of its data
        with contextlib.suppress(MlfdError):
            recorded(ws, name)

    def row(stage, target, art, fingerprint):
        try:
            st = art.status(fingerprint())
            note = ""
        except MlfdError as e:  # e.g. data not at hand: staleness cannot be checked
            st = art.status(None)
            note = f" (not checked for staleness: {e})"
        state = STATE_WORDS.get(st.state, st.state)
        reason = st.reason
        partial = art.partial()
        if st.state == "missing" and partial is not None:
            state = "incomplete"
            reason = (f"run in progress or interrupted at epoch {partial.get('epoch')}/"
                      f"{partial.get('epochs')}")
        return {"stage": stage, "target": target, "status": state, "reason": reason + note}

    rows = []
    for e in ws.exp.datasets:
        rows.append(row("teach", e.name, Artifact(ws.teacher_dir(e.name)),
                        lambda e=e: teacher_fingerprint(ws, e.name)))
    for k in trained_levels(ws, "joint") or [ws.exp.levels]:
        rows.append(row("fuse", f"joint L{k}", Artifact(ws.joint_dir(k)),
                        lambda k=k: joint_fingerprint(ws, k)))
    for e in ws.exp.datasets:
        for k in trained_levels(ws, "student", e.name) or [ws.exp.levels]:
            rows.append(row("distill", f"{e.name} L{k}", Artifact(ws.student_dir(e.name, k)),
                            lambda e=e, k=k: student_fingerprint(ws, e.name, k)))
    for arch in amalgam_archs(ws):
        for k in trained_levels(ws, "student", amalgam_name(arch)):
            rows.append(row("amalgamate", f"amalgamated {arch} L{k}",
                            Artifact(amalgam_dir(ws, arch, k)),
                            lambda a=arch, k=k: amalgam_fingerprint(ws, a, k)))
    base = ws.root / "baselines"
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if base.is_dir() else []:
        art = Artifact(d)
        meta = load_meta_safe(d / "last") or {}
        if {"baseline", "arch", "input_size"} <= set(meta):
            fp = lambda m=meta: baseline_fingerprint(ws, m["baseline"], m["arch"],  # noqa: E731
                                                     m["input_size"])
        else:
            fp = lambda: None  # noqa: E731
        rows.append(row("baseline", d.name, art, fp))
    return rows


@command("list")
def list_(root: Annotated[Path, typer.Option(
              "--root", metavar="DIR", help="Where to look for experiments.")] = Path("mlfd-runs"),
          data_root: DataRoot = None, json_out: Json = False):
    """Each experiment under --root and the status of its results (read-only).

    Per stage: complete, stale (made from other inputs than the experiment
    now asks for), incomplete (interrupted or running), corrupt or missing.

    Example: mlfd list --root mlfd-runs --json
    """
    from mlfd.storage.staging import set_read_only
    from mlfd.workspace import Workspace, find_experiments

    set_read_only()  # no lock is taken: leave any running stage's files as they are
    experiments, table = [], []
    for w in find_experiments(root):
        doc = {"workdir": str(w)}
        try:
            ws = Workspace.open(w, data_root=data_root)
            doc.update(preset=ws.exp.preset, datasets=ws.exp.names(), stages=_stage_rows(ws))
        except MlfdError as e:
            doc.update(error=str(e), stages=[])
            table.append({"experiment": w.name, "stage": "-", "target": "-", "status": "error",
                          "reason": str(e)})
        table += [dict(experiment=w.name, **r) for r in doc["stages"]]
        experiments.append(doc)
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=json_out)
    if not console.is_terminal:
        console.width = max(console.width, 110)
    if not experiments:
        console.print(f"no experiments under {root}/")
    else:
        t = Table(title=f"mlfd experiments under {root}/")
        for col in ("experiment", "stage", "target", "status", "reason"):
            t.add_column(col)
        for r in table:
            t.add_row(*(str(r[c]) for c in ("experiment", "stage", "target", "status", "reason")))
        console.print(t)
    if json_out:
        sys.stdout.write(json.dumps({"root": str(root), "experiments": experiments}) + "\n")


REBUILT = ("teachers", "joint", "students", "baselines", "reports", "cache")


STAGED_IN = ("teachers", "joint", "students", "baselines")  # where training runs are staged
STORE_KINDS = {"teachers": "teacher-embeddings", "targets": "joint-targets"}  # <name>-L<K>.zarr
REPORT_FILES = ("results.json", "results.md", "curves-*.png")


def _store_judge(ws, name: str):
    """judge(group, fingerprint) for ``store.foreign``: why a group of the cache store
    ``name`` is not this experiment's (None: it is); None for a name mlfd never gives."""
    import re

    m = re.fullmatch(r"\.?(teachers|targets)-L([1-9][0-9]*)\.zarr(?:\.partial)?", name)
    if m is None:
        return None
    names = set(ws.exp.names())

    def judge(group: str, fp: dict) -> str | None:
        dataset, split = group.split("/")
        split = re.sub(r"^\.(.+)\.(?:partial|old)$", r"\1", split)  # a staged group
        want = (STORE_KINDS[m[1]], int(m[2]), dataset, split)
        if dataset not in names or (fp.get("kind"), fp.get("level"), fp.get("dataset"),
                                    fp.get("split")) != want:
            return f"not the {m[1]} cache of this experiment"
        return None

    return judge


Found = list[tuple[str, int, Callable[[], None]]]  # (path, bytes, remove) of what clean removes


def _cache_stores(ws, location) -> tuple[Found, list[tuple[str, str]]]:
    """([(path, bytes, remove)] of this experiment's cache stores under ``location``,
    [(path, why)] of the other ``*.zarr`` there): a shared directory keeps the others."""
    from mlfd.cache import foreign, stores_under

    mine, others = [], []
    for p, d in stores_under(location):
        judge = _store_judge(ws, p.rstrip("/").rsplit("/", 1)[-1])
        why = "not a name mlfd gives a cache store" if judge is None else foreign(d, judge)
        if why:
            others.append((p, why))
        else:
            mine.append((p, d.nbytes(), d.remove))
    return mine, others


def _mlfd_result(d: Path) -> bool:
    """A trained result's directory: its checkpoint metadata says mlfd wrote it."""
    for name in ("last.json", "best.json"):
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((d / name).read_text())
            if isinstance(meta, dict) and "mlfd_version" in meta and "fingerprint" in meta:
                return True
    return False


def _made_by_mlfd(p: Path, top: str) -> bool:
    """Whether mlfd made ``p``, in (or below) its layout directory ``top``: a staged run,
    a trained result, a report file."""
    from fnmatch import fnmatch

    if p.is_symlink():
        return False
    if p.is_dir():
        staged = p.name.startswith(".") and p.name.endswith((".partial", ".old"))
        return top in STAGED_IN and (staged or _mlfd_result(p))
    return top == "reports" and any(fnmatch(p.name, f) for f in REPORT_FILES)


def _sweep(d: Path, top: str) -> tuple[list[Path], list[Path]] | None:
    """(what mlfd made under directory ``d``, the rest); None when mlfd made all of it
    (an empty directory too): then ``d`` goes whole."""
    mine, others = [], []
    for p in sorted(d.iterdir()):
        if _made_by_mlfd(p, top):
            mine.append(p)
        elif p.is_dir() and not p.is_symlink():
            inside = _sweep(p, top)
            if inside is None:
                mine.append(p)
            else:
                mine += inside[0]
                others += inside[1]
        else:
            others.append(p)
    return None if not others else (mine, others)


def _clean_targets(ws, everything: bool) -> tuple[Found, list[tuple[str, str]]]:
    """What `clean` removes, [(path, bytes, remove)]: this experiment's cache stores and
    staged runs; with ``everything`` all results too. And what it leaves alone although it
    lies where those do, [(path, why)]: mlfd deletes only what it made (design §13)."""
    root, found, kept = ws.root, [], []

    def take(p: Path) -> None:
        found.append((str(p), _size(p), partial(_remove, p)))

    locations, elsewhere = [root / "cache"], ws.cache_root()
    if ws.exp.cache.uri and not (isinstance(elsewhere, Path)
                                 and elsewhere.resolve() == (root / "cache").resolve()):
        locations.append(elsewhere)  # caches kept elsewhere (cache.uri) are this workdir's too
    for i, location in enumerate(locations):
        if isinstance(location, Path) and (not location.is_dir() or location.is_symlink()):
            continue
        mine, others = _cache_stores(ws, location)
        if i == 0 and everything:  # <workdir>/cache itself: whole if all in it is mlfd's
            seen = {p for p, *_ in mine} | {p for p, _ in others}
            others += [(str(p), "not made by mlfd") for p in sorted(location.iterdir())
                       if str(p) not in seen]
            if not others:
                take(location)
                continue
        found += mine
        kept += others
    if everything:
        for top in REBUILT:
            d = root / top
            if top == "cache" or not d.is_dir() or d.is_symlink():
                continue
            inside = _sweep(d, top)
            if inside is None:
                take(d)
            else:
                for p in inside[0]:
                    take(p)
                kept += [(str(p), "not made by mlfd") for p in inside[1]]
        return found, kept
    for top in STAGED_IN:  # staged (interrupted) training runs
        for d, dirs, _ in os.walk(root / top):
            for name in list(dirs):
                if name.startswith(".") and name.endswith(".partial"):
                    take(Path(d) / name)
                    dirs.remove(name)
    return found, kept


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum((Path(d) / f).lstat().st_size for d, _, files in os.walk(path) for f in files)


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


@command()
def clean(workdir: Workdir = None,
          caches: Annotated[bool, typer.Option(
              "--caches", metavar="", help="Remove this experiment's cache stores (cache/*.zarr, "
                                           "and those under cache.uri) and staged runs "
                                           "(.*.partial): trained results stay.")] = False,
          everything: Annotated[bool, typer.Option(
              "--all", metavar="", help="Also remove every trained result and report; "
                                        "experiment.yaml stays.")] = False,
          dry_run: Annotated[bool, typer.Option(
              "--dry-run", "-n", metavar="", help="Print what would be removed; remove nothing.")]
          = False,
          json_out: Json = False):
    """Remove what can be rebuilt, and say how many bytes that freed.

    --caches: embedding caches and interrupted (staged) runs. --all: also
    teachers, joint teachers, students, baselines and reports; only
    experiment.yaml stays. Only what mlfd made goes: a store under cache.uri
    that is not this experiment's, or a file mlfd did not write, is left alone
    (and listed). Takes the workdir's lock.

    Example: mlfd clean --workdir mlfd-runs/demo --caches
    """
    from mlfd.storage.staging import set_read_only
    from mlfd.workspace import EXPERIMENT_FILE, Workspace

    if not (caches or everything):
        raise MlfdError("clean needs --caches (caches and staged runs) or --all (everything "
                        "but experiment.yaml)")
    root = Path(workdir) if workdir is not None else session.find_workdir(None)
    if not (root / EXPERIMENT_FILE).is_file():  # only an experiment's workdir is cleaned
        raise MlfdError(f"{root} holds no {EXPERIMENT_FILE}: not an mlfd workdir, nothing "
                        "removed")
    ws = Workspace.open(root)

    def shown(p: str):
        return Path(p).relative_to(ws.root) if Path(p).is_relative_to(ws.root) else p

    def report(sizes: list[tuple[str, int]], kept: list[tuple[str, str]]) -> None:
        total = sum(n for _, n in sizes)
        write = partial(print, file=sys.stderr if json_out else sys.stdout)
        verb = "would remove" if dry_run else "removed"
        for p, n in sizes:
            write(f"{verb} {shown(p)} ({_human(n)})")
        for p, why in kept:  # on stderr: a warning, not a result
            print(f"left alone {shown(p)}: {why}", file=sys.stderr)
        write(f"{verb} {len(sizes)} path(s), {total} bytes ({_human(total)}) from {ws.root}"
              + (f" and {ws.exp.cache.uri}" if ws.exp.cache.uri else "")
              + ("; dry run: nothing was removed" if dry_run else ""))
        if json_out:
            sys.stdout.write(json.dumps({
                "workdir": str(ws.root), "dry_run": dry_run, "bytes": total,
                "removed": [{"path": p, "bytes": n} for p, n in sizes],
                "left_alone": [{"path": p, "reason": why} for p, why in kept]}) + "\n")

    if dry_run:
        set_read_only()  # no lock is taken: nothing is touched
        found, kept = _clean_targets(ws, everything)
        return report([(p, n) for p, n, _ in found], kept)
    with ws.locked():
        sizes = []
        found, kept = _clean_targets(ws, everything)
        for p, n, remove in found:
            remove()
            sizes.append((p, n))
    report(sizes, kept)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


@command()
def info(json_out: Json = False,
         check: Annotated[bool, typer.Option(
             "--check", metavar="",
             help="Check every fast path against its reference (Triton kernel, torch.compile, "
                  "DALI GPU decoding, DALI vs driver, bf16/fp16) and show one row each; "
                  "cached per environment, so it runs once.")] = False,
         refresh: Annotated[bool, typer.Option(
             "--refresh", metavar="", help="With --check: run it again, ignoring the cache.")]
         = False):
    """Versions, the DALI build against the driver, and what `auto` uses (fast paths).

    Examples:\n
      mlfd info\n
      mlfd info --check --json
    """
    from mlfd.info import collect

    doc = collect(check=check or refresh, refresh=refresh)
    if json_out:
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="mlfd info", show_header=False)
    for k, v in doc.items():
        if k != "check":
            t.add_row(k, str(v))
    Console().print(t)
    if "check" in doc:
        rep = doc["check"]
        c = Table(title="fast paths" + (f" (cached {rep['created']})" if rep["cached"] else ""))
        for col in ("path", "status", "detail"):
            c.add_column(col)
        style = {"ok": "green", "failed": "red", "unavailable": "yellow"}
        for r in rep["rows"]:
            detail = r["detail"] + (f"; fix: {r['fix']}" if r.get("fix") else "")
            c.add_row(r["name"], f"[{style[r['status']]}]{r['status']}[/]", detail)
        Console().print(c)
