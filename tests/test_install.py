"""The README's install: plain timm/torchvision import in its environment (issue 10)."""

import subprocess
import sys
import sysconfig
from pathlib import Path


def test_plain_timm_imports_without_mlfd():
    # A fresh interpreter of this environment, as a user's `python -c "import timm"`:
    # the installed .pth must make torchvision importable without importing mlfd first.
    code = ("import sys, timm, torchvision.transforms.v2; "
            "m = timm.create_model('test_vit', num_classes=3, img_size=32); "
            "print(type(m).__name__, 'mlfd' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]
    assert proc.stdout.split() == ["VisionTransformer", "False"]


def test_startup_hook_is_installed_and_cheap():
    pth = Path(sysconfig.get_paths()["purelib"]) / "mlfd-torchvision-cpu.pth"
    assert pth.is_file(), "pip install -e . should have put the .pth in site-packages"
    # Start-up must not import torch: every Python of the environment pays for it.
    proc = subprocess.run([sys.executable, "-c", "import sys; print('torch' in sys.modules, "
                           "'mlfd_torchvision_hook' in sys.modules)"],
                          capture_output=True, text=True)
    assert proc.stdout.split() == ["False", "True"]
