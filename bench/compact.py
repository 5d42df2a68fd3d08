"""Compact teacher targets (issue 19 §3): cache bytes and student top-1 of fp16, bf16, int8
and int8 + top-K logits on the demo, per seed, at L1 and L2.

    python bench/compact.py run --seeds 0 1 2 --root /tmp/compact   # the trainings
    python bench/compact.py report --root /tmp/compact               # the tables

`run`, per seed: `mlfd distill --dataset all --levels 1`, then `--levels 2`, in
<root>/s<seed>-float16 (the demo preset); then copies of that finished workdir with
`cache.dtype` (and `cache.logits_topk`) changed, where the same two commands rebuild only
the targets and the students (int8 keeps the teacher-embedding cache float16, so the
joint teacher is reused; bfloat16 also rebuilds the embedding cache and the joint teacher).

`report` reads the workdirs that finished, measures `targets-L<K>.zarr` (all datasets,
every file) and takes the students' top-1 from the commands' --json output; it also
measures, on the fp16 targets of the first seed, int8's error and size per channel group
of the L2 maps (one scale per channel ... one per row). Writes
bench/results/compact-targets-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"float16": ("float16", 0), "bfloat16": ("bfloat16", 0), "int8": ("int8", 0),
            "int8-top5": ("int8", 5)}


def _distill(work: Path, levels: int, seed: int, preset: bool) -> int:
    cmd = [sys.executable, "-m", "mlfd_cli.main", "distill", "--dataset", "all", "--levels",
           str(levels), "--seed", str(seed), "--workdir", str(work), "--json",
           *(["--preset", "demo"] if preset else [])]
    with open(work / f"L{levels}.json", "w") as out, open(work / f"L{levels}.log", "w") as log:
        return subprocess.run(cmd, stdout=out, stderr=log,
                              env=dict(os.environ, MLFD_NO_PROGRESS="1")).returncode


def run(root: Path, seeds: list[int], variants: list[str]) -> None:
    import yaml

    for seed in seeds:
        base = root / f"s{seed}-float16"
        base.mkdir(parents=True, exist_ok=True)
        for k in (1, 2):
            if _distill(base, k, seed, preset=True):
                raise SystemExit(f"seed {seed} float16 L{k} failed: see {base}/L{k}.log")
        for name in variants:
            if name == "float16":
                continue
            work = root / f"s{seed}-{name}"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(base, work, symlinks=True)
            exp = yaml.safe_load((work / "experiment.yaml").read_text())
            exp["cache"]["dtype"], topk = VARIANTS[name]
            if topk:
                exp["cache"]["logits_topk"] = topk
            (work / "experiment.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
            for k in (1, 2):
                if _distill(work, k, seed, preset=False):
                    raise SystemExit(f"seed {seed} {name} L{k} failed: see {work}/L{k}.log")


def _nbytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _students(work: Path, levels: int) -> dict[str, float] | None:
    try:
        doc = json.loads((work / f"L{levels}.json").read_text())
    except (OSError, ValueError):
        return None
    rows = {r["dataset"]: r["top1"] for r in doc["rows"]
            if r["model"] == "student" and r.get("levels") == levels and r.get("top1") is not None}
    return rows or None


def group_errors(fp16_group: Path) -> list[dict]:
    """int8 error and stored bytes of the L2 maps per channel group, on real fp16 targets:
    values + scales compressed as the store does (Blosc zstd 5, byte shuffle)."""
    import numcodecs
    import zarr

    from mlfd.cache.quant import channel_group, quantise

    x = zarr.open_group(str(fp16_group), mode="r")["L2"][...].astype(np.float32)
    blosc = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    fp16_bytes = len(blosc.encode(np.ascontiguousarray(x.astype(np.float16))))
    x64 = x.astype(np.float64)
    rms = float(np.sqrt((x64 ** 2).mean()))
    out = []
    c = x.shape[2]
    for g in sorted({1, 2, 4, 8, 16, 32, c} & set(range(1, c + 1))):
        if c % g:
            continue
        q, s = quantise(x, g)
        deq = q.astype(np.float64) * np.repeat(s.astype(np.float64), g, axis=2)[..., None, None]
        err = deq - x64
        stored = len(blosc.encode(q)) + len(blosc.encode(s))
        out.append({"channels_per_scale": g, "default": g == channel_group(x.shape),
                    "rms_error_rel": float(np.sqrt((err ** 2).mean())) / rms,
                    "max_error_rel": float(np.abs(err).max()) / float(np.abs(x64).max()),
                    "bytes": stored, "fp16_bytes": fp16_bytes,
                    "fp16_over_int8": fp16_bytes / stored})
    return out


def reencoded(store: Path) -> dict[str, int]:
    """Bytes of a fp16 targets store written again, same values, in each variant's dtype
    (and top-K): the size comparison on identical data, bf16 included."""
    import tempfile

    import torch
    import zarr

    from mlfd.cache import CacheGroup
    from mlfd.cache.quant import TOPK_INDEX, index_dtype, topk_pack

    sizes = {}
    with tempfile.TemporaryDirectory(prefix="mlfd-compact-") as tmp:
        for name, (dtype, topk) in VARIANTS.items():
            total = 0
            for src in sorted(store.glob("*/train")):
                fp16 = CacheGroup(src, dict(zarr.open_group(str(src), mode="r").attrs)
                                  ["fingerprint"])
                arrays = {k: torch.from_numpy(v) for k, v in fp16.load().items()}
                c = arrays["logits"].shape[-1]
                if topk:
                    arrays["logits"], arrays[TOPK_INDEX] = topk_pack(arrays["logits"].float(),
                                                                     topk)
                g = CacheGroup(Path(tmp) / name / src.parent.name / "train", {"x": 1})
                spec = {k: (tuple(v.shape), "int64" if k == "labels" else index_dtype(c)
                            if k == TOPK_INDEX else dtype) for k, v in arrays.items()}
                w = g.begin(spec)
                for k, v in arrays.items():
                    w.append(k, v.float() if v.is_floating_point() else v)
                w.close()
                total += g.nbytes()
            sizes[name] = total
    return sizes


def report(root: Path, seeds: list[int], out: Path | None, note: str = "") -> None:
    import torch

    import mlfd
    from mlfd.info import cpu_model

    rows = []
    for seed in seeds:
        for name in VARIANTS:
            work = root / f"s{seed}-{name}"
            for k in (1, 2):
                top1 = _students(work, k)
                store = work / "cache" / f"targets-L{k}.zarr"
                if top1 is None or not store.is_dir():
                    continue  # not (yet) finished: left out, never guessed
                rows.append({"seed": seed, "variant": name, "levels": k,
                             "targets_bytes": _nbytes(store), "top1": top1,
                             "top1_mean": float(np.mean(list(top1.values())))})
    first = next((s for s in seeds if _students(root / f"s{s}-float16", 2)), None)
    groups = []
    if first is not None:
        g = next((root / f"s{first}-float16" / "cache" / "targets-L2.zarr").glob("*/train"))
        groups = [{"group": f"seed {first}, {g.parent.name}/train", **r}
                  for r in group_errors(g)]
    same_values = []
    for seed in seeds:
        for k in (1, 2):
            store = root / f"s{seed}-float16" / "cache" / f"targets-L{k}.zarr"
            if _students(root / f"s{seed}-float16", k) and store.is_dir():
                same_values.append({"seed": seed, "levels": k, "bytes": reencoded(store)})
    result = {
        "bench": "compact-targets",
        "command": f"python bench/compact.py run --root {root} --seeds "
                   + " ".join(map(str, seeds)),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "mlfd": mlfd.__version__},
        "note": note, "preset": "demo", "variants": {k: {"dtype": d, "logits_topk": t}
                                       for k, (d, t) in VARIANTS.items()},
        "rows": rows, "same_values_bytes": same_values, "channel_groups_L2": groups,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", result["machine"]["cpu"].lower()).strip("-")[:40]
    out = out or ROOT / "bench" / "results" / f"compact-targets-{slug}-{dt.date.today()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# Compact targets on the demo ({result['machine']['cpu']}, "
             f"{result['date'][:10]})", "",
             "targets-L<K>.zarr: every file of the three datasets' target groups. top-1: "
             "students' test top-1, mean of the three datasets; ± is the spread (max - min) "
             "over the seeds that finished.", *(["", result["note"]] if result["note"] else []),
             "",
             "| level | variant | seeds | targets bytes | float16 / this | student top-1 (mean) | "
             "per seed |", "|---|---|---|---|---|---|---|"]
    for k in (1, 2):
        base = {r["seed"]: r["targets_bytes"] for r in rows
                if r["variant"] == "float16" and r["levels"] == k}
        for name in VARIANTS:
            mine = [r for r in rows if r["variant"] == name and r["levels"] == k]
            if not mine:
                continue
            b = np.mean([r["targets_bytes"] for r in mine])
            ratio = [base[r["seed"]] / r["targets_bytes"] for r in mine if r["seed"] in base]
            t = [r["top1_mean"] for r in mine]
            lines.append(
                f"| L{k} | {name} | {','.join(str(r['seed']) for r in mine)} | "
                f"{b / 2**20:.2f} MiB | {np.mean(ratio):.2f}x | "
                f"{100 * np.mean(t):.2f} ± {100 * (max(t) - min(t)):.2f} | "
                + " / ".join(f"{100 * v:.2f}" for v in t) + " |"
                if ratio else f"| L{k} | {name} | ... | {b / 2**20:.2f} MiB | n/a | "
                f"{100 * np.mean(t):.2f} | |")
    if result["same_values_bytes"]:
        lines += ["", "The same values (each seed's fp16 targets) written again in each "
                  "variant's storage: bytes, and float16 / variant:", "",
                  "| seed | level | " + " | ".join(VARIANTS) + " |",
                  "|---|---|" + "---|" * len(VARIANTS)]
        for r in result["same_values_bytes"]:
            b = r["bytes"]
            lines.append(f"| {r['seed']} | L{r['levels']} | " + " | ".join(
                f"{b[v] / 2**20:.2f} MiB ({b['float16'] / b[v]:.2f}x)" for v in VARIANTS) + " |")
    if result["channel_groups_L2"]:
        first = result["channel_groups_L2"][0]
        lines += ["", f"int8 L2 maps ({first['group']}), quantised from its fp16 targets, "
                  "by channels per scale (errors against the fp16 values):",
                  "", "| channels per scale | RMS error / RMS | max error / max | bytes | "
                  "fp16 / int8 |", "|---|---|---|---|---|"]
        for r in result["channel_groups_L2"]:
            mark = " (default)" if r["default"] else ""
            lines.append(f"| {r['channels_per_scale']}{mark} | {r['rms_error_rel']:.4f} | "
                         f"{r['max_error_rel']:.4f} | {r['bytes']} | "
                         f"{r['fp16_over_int8']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["run", "report"])
    ap.add_argument("--root", type=Path, required=True, help="where the workdirs live")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default="", help="report: how the runs were made, if not by run")
    args = ap.parse_args()
    if args.what == "run":
        run(args.root, args.seeds, args.variants)
    else:
        report(args.root, args.seeds, args.out, args.note)


if __name__ == "__main__":
    main()
