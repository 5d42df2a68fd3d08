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


def test_declared_ops_survive_any_import_order_and_a_collection():
    # site.py reads the .pth twice in a venv whose lib64 links to lib; a duplicate hook copy
    # once declared the ops and was then collected, and torchvision died registering nms.
    code = ("import sys, gc\n"
            "from mlfd.presets import get_preset\n"
            "gc.collect()\n"
            "import timm, torchvision.transforms.v2\n"
            "print(sum(type(f).__name__ == '_BeforeTorchvision' for f in sys.meta_path), "
            "timm.create_model('test_efficientnet', num_classes=2).num_classes)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]
    assert proc.stdout.split() == ["0", "2"]  # the hook stepped aside once torchvision loaded


def test_the_startup_line_runs_once_per_process():
    pth = Path(sysconfig.get_paths()["purelib"]) / "mlfd-torchvision-cpu.pth"
    line = pth.read_text()
    code = (f"{line}\n{line}\nimport sys\n"
            "print(sum(type(f).__name__ == '_BeforeTorchvision' for f in sys.meta_path))")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1"]
