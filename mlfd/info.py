"""Versions and active fast paths, for `mlfd info`."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (bench results and `mlfd info` name their machine)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(check: bool = False, refresh: bool = False) -> dict:
    """Versions, the DALI build against the driver, and what ``auto`` uses on this machine.

    On CUDA that comes from the fast-path check (mlfd.fastpaths): the cached one, or, with
    ``check``, the one run now when none is cached (``refresh``: run it again anyway). On
    CPU ``auto`` needs no check; ``check`` still runs it (Triton under TRITON_INTERPRET=1,
    DALI in CPU mode) and adds its rows.
    """
    import torch

    from . import __version__, fastpaths
    from .data.pipelines import dali_available, resolve_pipeline
    from .fastpaths import environment  # by attribute: tests simulate a machine there
    from .losses.kd import triton_available

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    wheels = environment.dali_wheels()
    driver = environment.driver_cuda_version()
    dali_cuda = sorted({environment.wheel_cuda_major(n) for n in wheels})
    report = fastpaths.check(device, refresh) if check or refresh else fastpaths.load_report(device)
    doc = {
        "mlfd": __version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "triton": _version("triton"),
        "nvidia-dali": ", ".join(f"{n} {v}" for n, v in wheels.items()) or None,
        "dali_wheels": wheels,
        "dali_cuda": dali_cuda[0] if len(dali_cuda) == 1 else (dali_cuda or None),
        "driver_cuda": None if driver is None else f"{driver[0]}.{driver[1]}",
        "zarr": _version("zarr"),
        "numcodecs": _version("numcodecs"),
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "triton_importable": triton_available(),
        "dali_importable": dali_available(),
    }
    if len(wheels) > 1:
        doc["dali_problem"] = (f"{len(wheels)} DALI wheels installed ({doc['nvidia-dali']}): "
                               "they overwrite each other; uninstall all but the one of your "
                               "driver's CUDA major")
    if environment.needs_check(device):
        if report is None:
            unchecked = "unchecked (run `mlfd info --check`)"
            defaults = {"loss_backend": unchecked, "pipeline": unchecked, "precision": unchecked}
        else:
            defaults = {kind: fastpaths.choose(kind, report)[0]
                        for kind in ("loss", "pipeline", "precision")}
            defaults["loss_backend"] = defaults.pop("loss")
    else:  # CPU: auto needs no check
        defaults = {"loss_backend": "torch", "pipeline": resolve_pipeline("auto"),
                    "precision": "fp32"}
    doc.update({f"default_{k}": v for k, v in defaults.items()})
    doc["triton_kernel_active"] = doc["default_loss_backend"] == "triton"
    doc["dali_gpu_active"] = cuda and doc["default_pipeline"] == "dali"
    if report is not None:
        doc["check"] = {k: report[k] for k in ("cached", "created", "cache_file", "key", "rows")}
    return doc
