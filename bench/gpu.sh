#!/usr/bin/env bash
# One prepared GPU check (issue 19 §4): on a CUDA machine, in one call of under 8 minutes,
#   1. installs what the machine lacks from carried wheels (.whl/*.whl, if present) and makes
#      this checkout importable without `pip install` (mlfd, mlfd_cli, mlfd_kernels);
#   2. `mlfd info --check --json`: every fast path against its reference (Triton kernel, compile,
#      DALI GPU decoding, bf16/fp16), the verdict the runs below then use;
#   3. the KD-loss bench (torch vs torch.compile vs Triton at the paper's shapes);
#   4. the data bench (DALI GPU vs DALI CPU vs the torch pipeline vs a DataLoader);
#   5. the demo one-liner with --device cuda (wall time, peak RSS, the accuracy table);
# each step timed out on its own so one hang cannot eat the others' time, each writing JSON
# named after the device into OUT (default bench/results). A step that fails is reported and
# the next one runs; the exit code says whether all of them passed.
#
#   bash bench/gpu.sh                  # on the GPU machine: OUT=bench/results
#   bash bench/gpu.sh --out "$OUT"     # the device tool's folder that comes back
#   bash bench/gpu.sh --check          # the same plumbing on CPU, tiny shapes, < 1-2 min (CI)
set -uo pipefail
cd "$(dirname "$0")/.."

check=0
out=bench/results
while [ $# -gt 0 ]; do
    case "$1" in
        --check) check=1 ;;
        --out) out="$2"; shift ;;
        *) echo "usage: bash bench/gpu.sh [--check] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python

# 1. What the machine lacks, from carried wheels; this checkout on the path as it is.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mlfd-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/mlfd-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import mlfd_kernels" 2>/dev/null; then
    # not installed here: the package's import name points at kernels/ (pyproject's package-dir)
    mkdir -p /tmp/mlfd-src && ln -sfn "$PWD/kernels" /tmp/mlfd-src/mlfd_kernels
    export PYTHONPATH="$PWD:/tmp/mlfd-src${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$py" - <<'PY'
import importlib.util
need = ["torch", "timm", "typer", "rich", "zarr", "numcodecs", "safetensors", "yaml",
        "pydantic", "platformdirs", "PIL", "matplotlib", "fsspec", "nvidia.dali"]
print(" ".join(n for n in need if importlib.util.find_spec(n.split(".")[0]) is None
               or (n == "nvidia.dali" and importlib.util.find_spec(n) is None)))
PY
)
if [ -n "$missing" ]; then
    echo "gpu.sh: not importable here: $missing (carry their wheels in .whl/: see the device README)"
    [ "$missing" = "nvidia.dali" ] || exit 1  # without DALI the benches run, less its rows
fi

mkdir -p "$out"
export MLFD_NO_PROGRESS=1 PYTHONUNBUFFERED=1
device=$("$py" - <<'PY'
import re
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40])
PY
)
today=$(date -u +%F)
if [ "$check" = 0 ] && [ "$device" = cpu ]; then
    echo "gpu.sh: no CUDA device here (use --check for the CPU dry run of the plumbing)" >&2
    exit 2
fi
tag="$device"
[ "$check" = 1 ] && tag="check-$device"
status=0
step() {  # step NAME SECONDS CMD...: one bench, timed out on its own, its result named
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}

# 2. The fast-path check first: its verdict is what the benches' `auto` choices use.
export MLFD_CACHE_DIR=${MLFD_CACHE_DIR:-/tmp/mlfd-cache}
step fastpaths 120 bash -c "'$py' -m mlfd_cli.main info --check --refresh --json \
    > '$out/fastpaths-$tag-$today.json'"
if [ "$check" = 1 ]; then
    step loss 60 "$py" bench/loss.py --quick --backends torch --repeats 2 --warmup 1 \
        --out "$out/loss-$tag-$today.json"
    step data 90 "$py" bench/data.py --quick --out "$out/data-$tag-$today.json"
    # the demo's plumbing on two tiny array datasets (the embedded demo takes minutes on CPU)
    tiny=$(mktemp -d)
    "$py" - "$tiny" <<'PY'
import sys

import numpy as np

for k, name in enumerate(("a", "b")):  # 3 classes: a bright bar at the class's own place
    rng = np.random.default_rng(k)
    parts = {}
    for split, n in (("train", 96), ("test", 48)):
        y = np.arange(n) % 3
        x = rng.integers(0, 40, (n, 32, 32, 1), dtype=np.uint8)
        for i, c in enumerate(y):
            x[i, 4 + 8 * c: 10 + 8 * c, 4:28] = 220
        parts[f"x_{split}"], parts[f"y_{split}"] = x, y
    np.savez(f"{sys.argv[1]}/{name}.npz", **parts)
PY
    step demo 120 "$py" bench/demo.py --dataset all --out "$out/demo-$tag-$today.json" -- \
        --teacher "$tiny/a.npz=test_resnet" --teacher "$tiny/b.npz=test_vit" --input-size 32 \
        --epochs 1 --batch-size 16 --device cpu --pipeline torch
    rm -rf "$tiny"
else
    step loss 150 "$py" bench/loss.py --out "$out/loss-$tag-$today.json"
    step data 120 "$py" bench/data.py --out "$out/data-$tag-$today.json"
    step demo 150 "$py" bench/demo.py --out "$out/demo-$tag-$today.json" -- --device cuda
fi
ls -l "$out" | grep -- "-$tag-$today" || true
exit $status
