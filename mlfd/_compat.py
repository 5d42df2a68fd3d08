"""Import-time remedies for the platform, applied before torchvision/timm load.

PyPI's torchvision wheel is a CUDA build; beside a CPU-only torch its ``_C``
extension fails to load and ``import torchvision`` dies registering the
``torchvision::nms`` fake kernel (pytorch/vision#9085). Declaring the missing
operator schemas is enough for timm and transforms v2 to import. Where ``_C``
loads (CUDA torch), nothing is changed.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_LIBRARY = None  # kept alive for the process: dropping it unregisters the ops


def ensure_torchvision_importable() -> None:
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in __import__("sys").modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    candidates = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    candidates += glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.pyd"))
    if not candidates:
        return
    try:
        torch.ops.load_library(candidates[0])
        return
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    lib.define("nms" + schema)
    lib.define("qnms" + schema)
    _LIBRARY = lib
