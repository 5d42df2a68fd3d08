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


def collect() -> dict:
    import torch

    from . import __version__
    from .data.pipeline import dali_available
    from .losses.kd import triton_available

    cuda = torch.cuda.is_available()
    triton_ok = triton_available()
    dali_ok = dali_available()
    return {
        "mlfd": __version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "triton": _version("triton"),
        "nvidia-dali": _version("nvidia-dali-cuda130") or _version("nvidia-dali-cuda120"),
        "zarr": _version("zarr"),
        "numcodecs": _version("numcodecs"),
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "triton_kernel_active": cuda and triton_ok,
        "dali_importable": dali_ok,
        "dali_gpu_active": cuda and dali_ok,
        "default_pipeline": "dali" if dali_ok else "torch",
        "default_loss_backend": "triton" if (cuda and triton_ok) else "torch",
    }
