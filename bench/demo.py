"""Wall time and peak memory of the README's one-liner on the embedded demo.

Runs `mlfd distill --dataset fashion-mnist-mini --levels 2` (or the command given
after `--`) in a fresh workdir as a child process, and writes
bench/results/demo-<machine>-<date>.json with the time, the child's peak RSS, the
versions and the final comparison table.

    python bench/demo.py                       # the README one-liner
    python bench/demo.py -- --dataset all      # extra options for `mlfd distill`
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch

    from mlfd.info import cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
            "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dataset", default="fashion-mnist-mini",
                    help="the student to distil (default: the README's; 'all' for every one)")
    ap.add_argument("extra", nargs="*", help="options appended to `mlfd distill` (after --)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mlfd-demo-"))
    if work.exists():
        shutil.rmtree(work)
    cmd = [sys.executable, "-m", "mlfd_cli.main", "distill", "--dataset", args.dataset,
           "--levels", "2", "--workdir", str(work), "--json", *args.extra]
    env = dict(os.environ, MLFD_NO_PROGRESS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"demo failed with exit code {proc.returncode}")
    doc = json.loads(proc.stdout)
    import torch

    import mlfd

    result = {
        "bench": "demo-one-liner",
        "command": "mlfd " + " ".join(cmd[3:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "mlfd": mlfd.__version__},
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "steps": doc["steps"],
        "rows": doc["rows"],
        "stage_log": [ln for ln in proc.stderr.splitlines() if ln.startswith("[")],
    }
    named = result["machine"]["gpu"] or result["machine"]["cpu"]  # what the run's speed is of
    slug = re.sub(r"[^a-z0-9]+", "-", named.lower()).strip("-")[:40]
    out = args.out or ROOT / "bench" / "results" / f"demo-{slug}-{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wall {wall:.1f} s, peak RSS {peak_kib / 1024:.0f} MiB -> {out}")
    pct = lambda v: "   n/a" if v is None else f"{100 * v:6.2f}"  # noqa: E731
    for r in doc["rows"]:
        lv = f" L{r['levels']}" if r["levels"] else ""
        print(f"  {r['dataset']:<20} {r['model']:<8}{lv:<4} top1 {pct(r['top1'])}  "
              f"top5 {pct(r['top5'])}  {r.get('status', '')}")

if __name__ == "__main__":
    main()
