"""mlfd: Multi-Level Feature Distillation of joint teachers trained on distinct datasets."""

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
