"""Import-time remedies for the platform, applied before torchvision/timm load.

PyPI's torchvision wheel is a CUDA build; beside a CPU-only torch its ``_C``
extension fails to load and ``import torchvision`` dies registering the
``torchvision::nms`` fake kernel (pytorch/vision#9085). Declaring the missing
operator schemas is enough for timm and transforms v2 to import. Where ``_C``
loads (CUDA torch), nothing is changed.

The remedy runs when mlfd is imported, and also for a plain ``import timm`` in the
same environment: the install puts ``mlfd-torchvision-cpu.pth`` in site-packages
(see setup.py), whose one line loads this file on its own — without importing mlfd or
torch, so interpreter start-up stays fast — and calls ``install_import_hook()``: the
first ``import torchvision`` of the process then applies the remedy just before it.
This file must therefore import nothing from mlfd.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None  # kept alive for the process: dropping it unregisters the ops


def ensure_torchvision_importable() -> None:
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
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
    try:  # already declared by another copy of this file (the start-up hook's)
        torch.ops.torchvision.nms  # noqa: B018
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    lib.define("nms" + schema)
    lib.define("qnms" + schema)
    _LIBRARY = lib


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Applies the remedy when torchvision is first looked up, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None  # the regular finders import it


def install_import_hook() -> None:
    if "torchvision" not in sys.modules and not any(
            isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
