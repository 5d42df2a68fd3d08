"""Packaging hooks beyond pyproject.toml: ship ``mlfd-torchvision-cpu.pth``.

The .pth makes a plain ``import timm``/``import torchvision`` work in the environment
mlfd is installed into, even where PyPI's CUDA torchvision sits beside a CPU torch (see
mlfd/_compat.py). It goes into regular wheels through build_py and into editable
installs (pip install -e) through editable_wheel.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "mlfd-torchvision-cpu.pth"  # sorts after __editable__.*.pth: mlfd is findable by then
# One line, run by site.py at start-up: load mlfd/_compat.py alone (no torch, no mlfd
# package import) and register its import hook; any failure leaves start-up untouched.
# Once per process: site.py may read the .pth twice (a venv's lib64 -> lib link).
LINE = (
    "import sys; 'mlfd_torchvision_hook' in sys.modules or exec(\"try:\\n"
    " import importlib.util as u, os\\n"
    " s = u.find_spec('mlfd')\\n"
    " f = os.path.join(list(s.submodule_search_locations)[0], '_compat.py')\\n"
    " m = u.module_from_spec(u.spec_from_file_location('mlfd_torchvision_hook', f))\\n"
    " sys.modules[m.__name__] = m\\n"
    " m.__spec__.loader.exec_module(m)\\n"
    " m.install_import_hook()\\n"
    "except Exception:\\n pass\")\n"
)


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        Path(self.build_lib, PTH).write_text(LINE)


class EditableWheelWithPth(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        # The editable wheel is assembled in installation_dir; files there land in site-packages.
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, PTH).write_text(LINE)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
