"""Benchmark of the multi-level KD loss backends (forward + backward) at the paper's sizes.

    python bench/loss.py                 # full grid; on a CUDA machine: torch, compile, triton
    python bench/loss.py --quick         # a few shapes (what a CPU-only machine can afford)

Backends: ``torch`` (eager reference), ``compile`` (torch.compile of the reference, compiled
afresh per case so no shape falls off the recompile limit), ``triton`` (the fused kernel; CUDA
only: the CPU interpreter says nothing about speed). Reported per case: median fwd+bwd time
(CUDA events on GPU, perf_counter elsewhere), peak extra memory (GPU: max_memory_allocated
above what the inputs held, produced .grad tensors included), and achieved GB/s of the ideal
fused pass (read s, t, labels, every u_k and v_k once; write dL/ds and every dL/du_k once)
against a device-to-device copy bandwidth measured in the same run. Each backend's loss and
gradients are also checked against the eager reference. Results go to
bench/results/loss-<device-slug>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from mlfd.losses.kd import KDLossConfig, kd_loss_reference

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def full_cases():
    cases = []
    for dtype in DTYPES:
        for C in (100, 200, 1000):
            for l1 in (512, 1280, 2048):
                for l2 in (None, 512, 2048):
                    cases.append(dict(B=256, C=C, l1=l1, l2=l2, dtype=dtype))
    return cases


def quick_cases():
    return [
        dict(B=256, C=100, l1=512, l2=None, dtype="fp32"),
        dict(B=256, C=1000, l1=2048, l2=512, dtype="fp32"),
        dict(B=256, C=200, l1=1280, l2=2048, dtype="bf16"),
    ]


def case_name(c):
    lv = f"L1={c['l1']}" + (f"+L2=7x7x{c['l2']}" if c["l2"] else "")
    return f"B{c['B']} C{c['C']} {lv} {c['dtype']}"


def make_inputs(c, device):
    dtype = DTYPES[c["dtype"]]
    B, C = c["B"], c["C"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    dims = [(c["l1"],)] + ([(c["l2"], 7, 7)] if c["l2"] else [])
    s = (rnd(B, C) * 3).requires_grad_()
    t = rnd(B, C) * 3
    y = torch.randint(0, C, (B,), generator=g).to(device)
    us = [rnd(B, *d).requires_grad_() for d in dims]
    vs = [rnd(B, *d) for d in dims]
    cfg = KDLossConfig(ce_weight=1.0, soft_weight=1.0, temperature=2.0,
                       level_weights=tuple(1.0 for _ in dims), label_smoothing=0.1)
    return s, t, y, us, vs, cfg


def ideal_bytes(c):
    """Bytes the ideal fused pass moves: read s, t, labels, u_k, v_k; write dL/ds, dL/du_k."""
    e = DTYPES[c["dtype"]].itemsize
    B, C = c["B"], c["C"]
    n = 3 * B * C * e + 8 * B
    for D in [c["l1"]] + ([c["l2"] * 49] if c["l2"] else []):
        n += 3 * B * D * e
    return n


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, repeats):
        out = []
        for _ in range(repeats):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return out


def copy_bandwidth(device, timer, repeats):
    """Device-to-device copy GB/s (read + write) of a buffer well beyond cache size."""
    nbytes = (256 if device.type == "cuda" else 64) << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    timer.sync()
    ts = timer.time(lambda: dst.copy_(src), max(repeats, 10))
    return 2 * nbytes / statistics.median(ts) / 1e9


def step_fn(fn, s, t, y, us, vs, cfg):
    def step():
        s.grad = None
        for u in us:
            u.grad = None
        loss, _ = fn(s, t, y, us, vs, cfg)
        loss.backward()
        return loss

    return step


def get_backend(name):
    if name == "torch":
        return kd_loss_reference
    if name == "compile":
        if not torch.cuda.is_available():
            # a compile-worker pool competes with the timed runs on a small CPU
            torch._inductor.config.compile_threads = 1
        torch._dynamo.reset()  # fresh compile per case: no recompile limit, no stale guards
        return torch.compile(kd_loss_reference, dynamic=False)
    if name == "triton":
        from mlfd_kernels.kd_loss import kd_loss_triton

        return kd_loss_triton
    raise ValueError(name)


def check(step, s, us, ref):
    """Max |difference| of loss and gradients from the eager reference's."""
    loss = step()
    grads = [s.grad] + [u.grad for u in us]
    ref_loss, ref_grads = ref
    gdiff = max((g.float() - r.float()).abs().max().item() for g, r in zip(grads, ref_grads, strict=True))
    return abs(loss.item() - ref_loss), gdiff


def run_case(c, backends, device, timer, repeats, warmup, bw_copy):
    s, t, y, us, vs, cfg = make_inputs(c, device)
    ref_step = step_fn(kd_loss_reference, s, t, y, us, vs, cfg)
    ref_loss = ref_step().item()
    ref = (ref_loss, [s.grad.clone()] + [u.grad.clone() for u in us])
    nbytes = ideal_bytes(c)
    rows = []
    for name in backends:
        row = dict(case=case_name(c), **c, backend=name, ideal_bytes=nbytes)
        try:
            fn = get_backend(name)
            step = step_fn(fn, s, t, y, us, vs, cfg)
            t0 = time.perf_counter()
            step()  # compiles (compile/triton) outside the timed region
            timer.sync()
            row["first_call_s"] = round(time.perf_counter() - t0, 3)
            for _ in range(warmup):
                step()
            timer.sync()
            if device.type == "cuda":
                for x in [s, *us]:
                    x.grad = None  # the measured step's own gradients count as extra
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
            else:
                row["peak_extra_mib"] = None
            ts = timer.time(step, repeats)
            med = statistics.median(ts)
            row["median_ms"] = round(med * 1e3, 4)
            row["min_ms"] = round(min(ts) * 1e3, 4)
            row["gbps"] = round(nbytes / med / 1e9, 2)
            row["pct_of_copy_bw"] = round(100 * nbytes / med / 1e9 / bw_copy, 1)
            dl, dg = check(step, s, us, ref)
            row["loss_abs_diff_vs_torch"] = dl
            row["grad_max_abs_diff_vs_torch"] = dg
        except Exception as e:  # keep the remaining backends/cases going; the row says why
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    return rows


def machine_info(device):
    import os

    from mlfd.info import cpu_model

    cpu = cpu_model()

    info = dict(device=device.type, cpu=cpu, cpu_count=os.cpu_count())
    if hasattr(os, "getloadavg"):  # other work on the machine makes timings noisy
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = f"CPU: {cpu}"
    return info


def versions():
    v = dict(python=platform.python_version(), torch=torch.__version__)
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = None
    return v


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def print_table(rows, header_lines):
    cols = ["case", "backend", "median_ms", "gbps", "pct_of_copy_bw", "peak_extra_mib",
            "grad_max_abs_diff_vs_torch"]
    heads = ["case", "backend", "ms", "GB/s", "% copy", "peak MiB", "max|dgrad|"]

    def cell(r, k):
        if "error" in r and k not in ("case", "backend"):
            return "ERR" if k == "median_ms" else ""
        v = r.get(k)
        if v is None:
            return "-"
        return f"{v:.2e}" if k == "grad_max_abs_diff_vs_torch" else str(v)

    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="KD loss fwd+bwd")
        for h in heads:
            table.add_column(h, justify="left" if h in ("case", "backend") else "right",
                             no_wrap=True)
        for r in rows:
            table.add_row(*[cell(r, k) for k in cols])
        console = Console(width=max(Console().width, 110))
        for line in header_lines:
            console.print(line)
        console.print(table)
    except ImportError:
        for line in header_lines:
            print(line)
        print(" | ".join(heads))
        for r in rows:
            print(" | ".join(cell(r, k) for k in cols))
    for r in rows:
        if "error" in r:
            print(f"error in {r['case']} [{r['backend']}]: {r['error']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes instead of the full grid")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    ap.add_argument("--repeats", type=int, default=None, help="timed iterations per case")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--backends", default=None,
                    help="comma list of torch,compile,triton (default: all that can run here)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    repeats = args.repeats or (20 if on_gpu else 10)
    notes = []
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = ["torch", "compile"] + (["triton"] if on_gpu else [])
    if not on_gpu:
        if "triton" in backends:
            backends.remove("triton")
        notes.append("No CUDA device: the GPU/Triton part was not run (Triton timings need a "
                     "GPU; the interpreter only checks correctness). CPU rows: torch and "
                     "compile backends; peak memory is not measured on CPU.")
    triton_run = "triton" in backends

    timer = Timer(device)
    bw_copy = copy_bandwidth(device, timer, repeats)
    cases = quick_cases() if args.quick else full_cases()
    info = machine_info(device)
    header = [f"device: {info['device_name']} | cpu: {info['cpu']} ({info['cpu_count']} cores)",
              f"copy bandwidth (d2d, read+write): {bw_copy:.1f} GB/s | repeats {repeats}",
              *notes]
    for line in header:
        print(line, flush=True)

    rows = []
    for c in cases:
        rows.extend(run_case(c, backends, device, timer, repeats, args.warmup, bw_copy))
        done = rows[-len(backends):]
        print(f"  {case_name(c)}: " + ", ".join(
            f"{r['backend']} {r.get('median_ms', 'ERR')} ms" for r in done), flush=True)

    today = dt.date.today().isoformat()
    dev_slug = slug(info["device_name"]) if on_gpu else "cpu-" + slug(info["cpu"])
    out = args.out or RESULTS / f"loss-{dev_slug}-{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        benchmark="kd_loss fwd+bwd",
        date=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=info,
        versions=versions(),
        args=dict(quick=args.quick, repeats=repeats, warmup=args.warmup, backends=backends),
        timing="cuda events" if on_gpu else "time.perf_counter",
        copy_bandwidth_gbps=round(bw_copy, 2),
        triton_run=triton_run,
        notes=notes,
        config=dict(temperature=2.0, label_smoothing=0.1, ce_weight=1.0, soft_weight=1.0,
                    level_weights=1.0),
        rows=rows,
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, [f"wrote {out}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
