"""What this machine has, as far as the fast paths care: the paths there are, the versions,
the device, the driver, the DALI wheel(s), and the key a verdict is cached under.

The other fastpaths modules call these functions by attribute (``environment.X()``), so a
test that patches them here simulates another machine for every caller at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

import torch

from .. import __version__

SCHEMA = 1  # bump when the probes change what they verify: old verdicts are then ignored
PATHS = {  # row id -> the name rows and warnings give it
    "triton": "Triton KD kernel",
    "compile": "torch.compile of the KD loss",
    "dali_driver": "DALI CUDA build vs driver",
    "dali_gpu_decode": "DALI GPU decoding",
    "dali_gpu_arrays": "DALI GPU array path",
    "dali_cpu": "DALI CPU pipeline",
    "bf16": "bf16 autocast",
    "fp16": "fp16 autocast with a GradScaler",
}
STATUSES = ("ok", "failed", "unavailable")

_DALI_WHEEL = re.compile(r"^nvidia-dali(?:-(?:nightly|weekly))?-cuda(\d+)$")


def dali_wheels() -> dict[str, str]:
    """Installed DALI wheels, {distribution name: version}. Two share the import path
    ``nvidia.dali`` and overwrite each other's files: a broken install."""
    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if _DALI_WHEEL.match(name):
            found[name] = dist.version
    return dict(sorted(found.items()))


def wheel_cuda_major(name: str) -> int | None:
    """The CUDA major a DALI wheel is built for: nvidia-dali-cuda130 -> 13."""
    m = _DALI_WHEEL.match(name)
    return int(m.group(1)) // 10 if m else None


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion), or None without
    a driver. Asked of libcuda directly: a CPU build of torch cannot tell."""
    try:
        lib = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
    except (OSError, AttributeError):
        return None
    return v.value // 1000, (v.value % 1000) // 10


def needs_check(device: torch.device) -> bool:
    """Whether ``auto`` on this device is decided by the check (CUDA) or needs none (CPU)."""
    return device.type == "cuda"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()})"


def _kernel_digest() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("mlfd_kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], "kd_loss.py")
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def env_key(device: torch.device) -> dict:
    """What the verdict depends on; a change of any of it means a new check."""
    drv = driver_cuda_version()
    return {"schema": SCHEMA, "mlfd": __version__, "kernel": _kernel_digest(),
            "python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton"), "dali": dali_wheels(), "device": device_name(device),
            "driver": None if drv is None else f"{drv[0]}.{drv[1]}",
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
