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

# The declaring torch.library.Library must live as long as the process: collecting it
# unregisters the ops. It is kept on torch.library itself, not in this module, because
# this file runs as several module copies (mlfd._compat and the start-up hook's, which a
# venv's lib64 -> lib link makes site.py load twice) and a copy can be garbage-collected.
_HOLDER = "_mlfd_torchvision_cpu_ops"


def ensure_torchvision_importable() -> None:
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    candidates = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    candidates += glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.pyd"))
    if not candidates:
        return
    if getattr(torch.library, _HOLDER, None) is not None:
        return  # declared by another copy of this file
    try:
        torch.ops.load_library(candidates[0])
        return
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    lib.define("nms" + schema)
    lib.define("qnms" + schema)
    setattr(torch.library, _HOLDER, lib)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Applies the remedy when torchvision is first looked up, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None  # the regular finders import it


def install_import_hook() -> None:
    # by name: another copy of this file defines another _BeforeTorchvision class
    if "torchvision" not in sys.modules and not any(
            type(f).__name__ == _BeforeTorchvision.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
