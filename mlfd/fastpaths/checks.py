"""The probes behind `mlfd info --check`: each fast path on a small case against its reference.

Every probe returns one row ``{"path", "name", "status", "detail", "fix"}`` with status
``ok``, ``failed`` (with its one-line cause) or ``unavailable`` (with the reason). A probe
that raises is a failure of its path, never of the check. ``PROBES`` maps row ids (see
:data:`mlfd.fastpaths.environment.PATHS`) to probes; each gets the device and the rows so
far (the DALI GPU probes need the driver's row). The global RNGs are left as they were.

Machine facts (wheels, driver, device name) come from :mod:`mlfd.fastpaths.environment`,
looked up by attribute there; this module imports no other part of mlfd.fastpaths.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from . import environment  # by attribute: a test that patches it simulates a machine


class Mismatch(Exception):
    """A fast path ran but disagreed with its reference."""


def _row(path: str, status: str, detail: str, fix: str | None = None) -> dict:
    return {"path": path, "name": environment.PATHS[path], "status": status, "detail": detail,
            "fix": fix}


def cause(e: BaseException) -> str:
    """One line: the exception's type and its first line of text."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = f"{e.__class__.__name__}: {lines[0]}" if lines else e.__class__.__name__
    return text if len(text) <= 240 else text[:237] + "..."


# ---- the KD loss: Triton kernel and torch.compile against the torch reference ----------------

def _loss_case(device: torch.device):
    """Two levels (a vector and a map), C=100, a label ignored, label smoothing on."""
    from ..losses.kd import IGNORE_INDEX, KDLossConfig

    g = torch.Generator().manual_seed(0)
    B, C = 16, 100
    s = torch.randn(B, C, generator=g) * 3
    t = torch.randn(B, C, generator=g) * 3
    y = torch.randint(0, C, (B,), generator=g)
    y[3] = IGNORE_INDEX
    us = [torch.randn(B, 48, generator=g), torch.randn(B, 8, 3, 3, generator=g)]
    vs = [torch.randn(B, 48, generator=g), torch.randn(B, 8, 3, 3, generator=g)]
    cfg = KDLossConfig(ce_weight=1.0, soft_weight=0.7, temperature=2.0, level_weights=(0.5, 0.25),
                       label_smoothing=0.1)
    return ([x.to(device) for x in (s, t, y)], [u.to(device) for u in us],
            [v.to(device) for v in vs], cfg)


def _loss_and_grads(backend: str, case):
    from ..losses.kd import kd_loss

    (s, t, y), us, vs, cfg = case
    s = s.clone().requires_grad_(True)
    us = [u.clone().requires_grad_(True) for u in us]
    loss, terms = kd_loss(s, t, y, us, vs, cfg, backend=backend)
    grads = torch.autograd.grad(loss, [s, *us])
    return loss.detach().double().cpu(), {k: v.double().cpu() for k, v in terms.items()}, \
        [g.double().cpu() for g in grads]


def _close(what: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Within rtol of the reference's largest magnitude (gradients have tiny entries)."""
    if actual.shape != expected.shape:
        raise Mismatch(f"{what} has shape {tuple(actual.shape)}, the torch loss "
                       f"{tuple(expected.shape)}")
    err = (actual - expected).abs().max().item()
    tol = rtol * max(expected.abs().max().item(), 1e-12)
    if not err <= tol:  # NaN fails too
        raise Mismatch(f"{what} differs from the torch loss by {err:.3g} (tolerance {tol:.2g})")


def compare_loss(backend: str, device: torch.device, rtol: float = 1e-4) -> str:
    case = _loss_case(device)
    ref_loss, ref_terms, ref_grads = _loss_and_grads("torch", case)
    loss, terms, grads = _loss_and_grads(backend, case)
    _close("the loss", loss, ref_loss, rtol)
    for k, v in ref_terms.items():
        if k not in terms:
            raise Mismatch(f"the {k} term is missing")
        _close(f"the {k} term", terms[k], v, rtol)
    for name, g, r in zip(["student logits", "L1", "L2"], grads, ref_grads, strict=True):
        _close(f"the gradient of the {name}", g, r, rtol)
    return (f"loss, {len(ref_terms)} terms and 3 gradients match the torch loss "
            "(B=16, C=100, 2 levels)")


def probe_triton(device: torch.device, rows: dict) -> dict:
    from ..losses.kd import triton_available

    if not triton_available():
        return _row("triton", "unavailable", "triton or mlfd_kernels is not importable",
                    "pip install triton")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        return _row("triton", "unavailable",
                    "no CUDA device (TRITON_INTERPRET=1 checks it under the interpreter)")
    detail = compare_loss("triton", device)
    where = " under the interpreter" if interpret else ""
    return _row("triton", "ok", detail + where)


def probe_compile(device: torch.device, rows: dict) -> dict:
    if device.type != "cuda":  # auto compiles only on CUDA; inductor on CPU is slow to check
        return _row("compile", "unavailable", "checked on CUDA only (auto never compiles on CPU)")
    return _row("compile", "ok", compare_loss("compile", device))


# ---- DALI --------------------------------------------------------------------------------

def install_hint(driver: tuple[int, int] | None) -> str:
    if driver is not None and driver[0] == 12:
        return 'pip install "mlfd[cuda12]" (or nvidia-dali-cuda120)'
    return 'pip install "mlfd[cuda13]" (a CUDA 13 driver) or "mlfd[cuda12]" (a CUDA 12 driver)'


def probe_dali_driver(device: torch.device, rows: dict) -> dict:
    wheels = environment.dali_wheels()
    drv = environment.driver_cuda_version()
    if len(wheels) > 1:
        listed = ", ".join(f"{n} {v}" for n, v in wheels.items())
        keep = next((n for n in wheels if drv and environment.wheel_cuda_major(n) == drv[0]), None)
        drop = [n for n in wheels if n != keep] if keep else list(wheels)
        fix = f"pip uninstall -y {' '.join(drop)}" + (f" (keep {keep})" if keep else "") + \
            ("" if keep else f", then {install_hint(drv)}")
        return _row("dali_driver", "failed",
                    f"two DALI wheels in one environment ({listed}) overwrite each other", fix)
    if not wheels:
        return _row("dali_driver", "unavailable", "nvidia-dali is not installed",
                    install_hint(drv) + " to decode on the GPU")
    name = next(iter(wheels))
    major = environment.wheel_cuda_major(name)
    if drv is None:
        return _row("dali_driver", "unavailable",
                    f"no CUDA driver ({name} is built for CUDA {major})")
    if drv[0] < major:
        if drv[0] == 12:
            fix = f"pip uninstall -y {name} && pip install nvidia-dali-cuda120 to decode on the GPU"
        else:
            fix = f"update the NVIDIA driver to CUDA {major} to decode on the GPU"
        return _row("dali_driver", "unavailable",
                    f"{name} needs a CUDA {major} driver, this one is {drv[0]}.{drv[1]}", fix)
    return _row("dali_driver", "ok",
                f"{name} (CUDA {major}) on a CUDA {drv[0]}.{drv[1]} driver")


def _embedded_images(n: int = 4) -> np.ndarray:
    """RGB test images from the embedded demo data: three digits/garments/animals per image,
    one per channel (colour exercises chroma), upscaled to 56 px (several JPEG blocks)."""
    from PIL import Image

    from ..data.datasets import get_dataset

    planes = [get_dataset(name).load("test").images[:n]
              for name in ("mnist-mini", "fashion-mnist-mini", "animal-mnist-mini")]
    rgb = np.stack([p.reshape(n, 28, 28) for p in planes], axis=-1)
    return np.stack([np.asarray(Image.fromarray(im).resize((56, 56), Image.BILINEAR))
                     for im in rgb]).astype(np.uint8)


def _pipeline_output(kind: str, split, device: str) -> torch.Tensor:
    from ..data.pipelines import PIPELINES, InputSpec, TorchPipeline, dali_available

    spec = InputSpec(size=(40, 40), channels=3, mean=(0.5, 0.45, 0.4), std=(0.25, 0.25, 0.25))
    n = len(split.labels)
    order = np.stack([np.arange(n), np.arange(n) % 2], 1).astype(np.int64)  # views 0 and 1
    if kind == "torch":
        pipe = TorchPipeline(split, spec, order, n, seed=1, device=device, num_workers=0)
    else:
        dali_available()  # registers PIPELINES["dali"]
        pipe = PIPELINES["dali"](split, spec, order, n, seed=1, device=device, num_workers=1)
    out = [b.images for b in pipe]
    x = torch.cat(out)
    if x.device.type != torch.device(device).type:
        raise Mismatch(f"the batch came back on {x.device}, not {device}")
    return x.float().cpu() * 0.25 * 255  # grey levels: every channel's std is 0.25


def _levels(what: str, a: torch.Tensor, b: torch.Tensor, mean_tol: float, max_tol: float) -> str:
    if a.shape != b.shape:
        raise Mismatch(f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
    d = (a - b).abs()
    mean, worst = d.mean().item(), d.max().item()
    if not (mean <= mean_tol and worst <= max_tol):
        raise Mismatch(f"{what} differs by {mean:.2f} grey levels on average, {worst:.1f} at "
                       f"most (tolerance {mean_tol:g} / {max_tol:g})")
    return f"{what} within {worst:.2g} grey levels"


def _files(images: np.ndarray, folder: str, fmt: str) -> list[str]:
    from PIL import Image

    paths = []
    for i, im in enumerate(images):
        paths.append(os.path.join(folder, f"{i}.{fmt}"))
        Image.fromarray(im).save(paths[-1], quality=90) if fmt == "jpg" else \
            Image.fromarray(im).save(paths[-1])
    return paths


def _dali_missing() -> str | None:
    from ..data.pipelines import dali_available

    if dali_available():
        return None
    try:
        from ..data.pipelines import dali  # noqa: F401
    except Exception as e:  # the reason the seam swallowed
        return cause(e)
    return "nvidia-dali is not importable"


def probe_dali_cpu(device: torch.device, rows: dict) -> dict:
    """DALI's CPU mode against the torch pipeline: arrays and decoded PNG files, views 0/1."""
    from ..data.datasets import Split

    missing = _dali_missing()
    if missing:
        return _row("dali_cpu", "unavailable", missing,
                    install_hint(environment.driver_cuda_version()))
    images = _embedded_images()
    labels = np.arange(len(images))
    arrays = Split(labels=labels, images=images)
    got = [_levels("arrays", _pipeline_output("dali", arrays, "cpu"),
                   _pipeline_output("torch", arrays, "cpu"), 0.01, 0.1)]
    with tempfile.TemporaryDirectory(prefix="mlfd-check-") as tmp:
        files = Split(labels=labels, files=_files(images, tmp, "png"))
        got.append(_levels("decoded PNG files", _pipeline_output("dali", files, "cpu"),
                           _pipeline_output("torch", files, "cpu"), 0.01, 0.1))
    return _row("dali_cpu", "ok", "; ".join(got) + " of the torch pipeline")


def _dali_gpu_blocked(path: str, device: torch.device, rows: dict) -> dict | None:
    if device.type != "cuda":
        return _row(path, "unavailable", "no CUDA device")
    drv = rows.get("dali_driver") or probe_dali_driver(device, rows)  # another process's row
    if drv["status"] != "ok":
        return _row(path, "unavailable", drv["detail"], drv.get("fix"))
    missing = _dali_missing()
    if missing:
        return _row(path, "unavailable", missing, install_hint(environment.driver_cuda_version()))
    return None


def _cuda(device: torch.device) -> str:
    return str(device) if device.type == "cuda" else "cuda"


def probe_dali_gpu_decode(device: torch.device, rows: dict) -> dict:
    """The `mixed` decoder on JPEGs of embedded images against DALI's CPU decoder. nvJPEG and
    libjpeg-turbo may round differently by a level or so; a wrong decode is off by far more."""
    from ..data.datasets import Split

    blocked = _dali_gpu_blocked("dali_gpu_decode", device, rows)
    if blocked:
        return blocked
    images = _embedded_images()
    with tempfile.TemporaryDirectory(prefix="mlfd-check-") as tmp:
        files = Split(labels=np.arange(len(images)), files=_files(images, tmp, "jpg"))
        detail = _levels("JPEG decoding", _pipeline_output("dali", files, _cuda(device)),
                         _pipeline_output("dali", files, "cpu"), 1.5, 24)
    return _row("dali_gpu_decode", "ok", detail + " of DALI CPU")


def probe_dali_gpu_arrays(device: torch.device, rows: dict) -> dict:
    from ..data.datasets import Split

    blocked = _dali_gpu_blocked("dali_gpu_arrays", device, rows)
    if blocked:
        return blocked
    images = _embedded_images()
    arrays = Split(labels=np.arange(len(images)), images=images)
    detail = _levels("arrays", _pipeline_output("dali", arrays, _cuda(device)),
                     _pipeline_output("dali", arrays, "cpu"), 0.05, 1.0)
    return _row("dali_gpu_arrays", "ok", detail + " of DALI CPU")


# ---- precision: one tiny training step against fp32 --------------------------------------

def bf16_native(device: torch.device) -> bool:
    """Whether the device computes bf16 natively (T4 and V100 emulate it, slowly)."""
    if device.type != "cuda":
        return True
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation
        return bool(torch.cuda.is_bf16_supported())


def _tiny_step(device: torch.device, precision: str):
    """(loss, gradients, parameters before and after one SGD step) of a tiny conv net."""
    import torch.nn.functional as F

    from ..engine.loop import autocast, grad_scaler

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 16, 16, generator=g).to(device)
    y = torch.randint(0, 10, (16,), generator=g).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).to(device)
    flat = lambda ts: torch.cat([t.detach().float().flatten() for t in ts]).cpu()  # noqa: E731
    before = flat(net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = grad_scaler(device, precision)
    with autocast(device, precision):
        loss = F.cross_entropy(net(x), y)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    grads = flat(p.grad for p in net.parameters())
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return float(loss.detach()), grads, before, flat(net.parameters())


def _probe_precision(path: str, device: torch.device) -> dict:
    if path == "bf16" and not bf16_native(device):
        return _row("bf16", "unavailable", f"{environment.device_name(device)} has no native bf16",
                    "--precision fp16 chooses fp16 without this warning")
    ref_loss, ref_g, _, ref_p = _tiny_step(device, "fp32")
    loss, g, before, p = _tiny_step(device, path)
    if not (np.isfinite(loss) and torch.isfinite(g).all() and torch.isfinite(p).all()):
        raise Mismatch("one training step gave non-finite values")
    if torch.equal(p, before):
        raise Mismatch("one training step left the parameters unchanged (the step was skipped)")
    rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    cos = torch.nn.functional.cosine_similarity(g, ref_g, dim=0).item()
    if not (rel <= 0.05 and cos >= 0.98):
        raise Mismatch(f"one training step: loss off by {rel:.1%}, gradient cosine {cos:.3f} "
                       "to fp32 (need <= 5%, >= 0.98)")
    step = (p - ref_p).abs().max().item()
    return _row(path, "ok", f"one training step on {device.type}: loss within {rel:.2%}, "
                            f"gradient cosine {cos:.4f} to fp32, parameters within {step:.2g}")


def probe_bf16(device: torch.device, rows: dict) -> dict:
    return _probe_precision("bf16", device)


def probe_fp16(device: torch.device, rows: dict) -> dict:
    return _probe_precision("fp16", device)


PROBES: dict[str, Callable[[torch.device, dict], dict]] = {
    "triton": probe_triton,
    "compile": probe_compile,
    "dali_driver": probe_dali_driver,
    "dali_gpu_decode": probe_dali_gpu_decode,
    "dali_gpu_arrays": probe_dali_gpu_arrays,
    "dali_cpu": probe_dali_cpu,
    "bf16": probe_bf16,
    "fp16": probe_fp16,
}

_FIXES = {  # what to do about a path that ran and failed
    "triton": "pip install -U triton, then `mlfd info --check --refresh`",
    "compile": "pip install -U torch, then `mlfd info --check --refresh`",
    "dali_gpu_decode": "pip install -U the DALI wheel of your driver, then "
                       "`mlfd info --check --refresh`",
    "dali_gpu_arrays": "pip install -U the DALI wheel of your driver, then "
                       "`mlfd info --check --refresh`",
    "dali_cpu": "pip install -U the DALI wheel of your driver, or --pipeline torch",
    "bf16": "--precision fp16 or fp32 chooses without this warning",
    "fp16": "--precision fp32 chooses without this warning",
}


def _run_one(path: str, device: torch.device, rows: dict) -> dict:
    t0 = time.perf_counter()
    try:
        row = PROBES[path](device, rows)
    except Mismatch as e:
        row = _row(path, "failed", str(e), _FIXES.get(path))
    except Exception as e:  # a crash of the path under test is its verdict
        row = _row(path, "failed", cause(e), _FIXES.get(path))
    if row["status"] == "failed" and not row.get("fix"):
        row["fix"] = _FIXES.get(path)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def run_all(device: torch.device) -> list[dict]:
    """One row per path, in PATHS order, in this process; each probe timed, its failure
    its own row."""
    rows: dict[str, dict] = {}
    for path in environment.PATHS:
        rows[path] = _run_one(path, device, rows)
    return list(rows.values())


_MARK = "mlfd-check-row "  # a row on the child's stdout (anything else printed is ignored)


def run_isolated(device: torch.device, paths=None, timeout: float = 900.0) -> list[dict]:
    """The probes in child processes (what CUDA runs get). A kernel that faults can leave
    the CUDA context unusable (illegal-address errors are sticky) or kill its process: in a
    child that is one failed row, and the run's own context never saw it. A child stops
    after a failed probe, so the next probes start on a fresh context."""
    import json
    import subprocess
    import sys

    todo, rows = list(paths or environment.PATHS), {}
    while todo:
        cmd = [sys.executable, "-m", "mlfd.fastpaths.checks", str(device), *todo]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            out, code, err = proc.stdout, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            code, err = None, ""
        for line in out.splitlines():
            if line.startswith(_MARK):
                row = json.loads(line[len(_MARK):])
                rows[row["path"]] = row
        left = [p for p in todo if p not in rows]
        if left and (code != 0 or len(left) == len(todo)):  # died in the probe of left[0]
            last = [ln for ln in err.splitlines() if ln.strip()][-1:]
            why = (f"timed out after {timeout:g} s" if code is None else
                   f"the check's process died (exit {code})" + (f": {last[0][:200]}" if last
                                                                else ""))
            rows[left[0]] = dict(_row(left[0], "failed", why, _FIXES.get(left[0])), seconds=None)
            left = left[1:]
        todo = left
    return [rows[p] for p in (paths or environment.PATHS)]


def _main(argv: list[str]) -> int:
    """`python -m mlfd.fastpaths.checks DEVICE PATH...`: one marked JSON row per probe."""
    import json

    device, rows = torch.device(argv[0]), {}
    for path in argv[1:]:
        rows[path] = _run_one(path, device, rows)
        print(_MARK + json.dumps(rows[path]), flush=True)
        if rows[path]["status"] == "failed" and device.type == "cuda":
            break  # its context may be broken: the parent starts a fresh process
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
