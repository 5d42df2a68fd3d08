"""timm backbones tapped at representation levels L1..LK through timm's feature API.

Levels are counted back from the classifier (design §2): L1 is the pooled pre-logits
vector (``forward_head(pre_logits=True)``), L2 the output of the last entry of
``feature_info`` (the last stage for CNNs, the last block for ViTs), L3 the entry
before, and so on. Maps come from ``forward_intermediates`` in NCHW.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import _compat
from ..errors import MlfdError

_compat.ensure_torchvision_importable()
import timm  # noqa: E402


def create_backbone(arch: str, num_classes: int, input_size: int | None = None,
                    drop_rate: float = 0.0, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """timm.create_model with clear errors; never downloads weights."""
    if not timm.is_model(arch):
        raise MlfdError(f"unknown timm architecture {arch!r} (see timm.list_models())")
    kw = dict(kwargs)
    if drop_path_rate:
        kw["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes,
                                 drop_rate=drop_rate, **kw)
    except TypeError as e:
        raise MlfdError(f"timm model {arch!r} rejected options {kw}: {e}") from None


_INITS = {"xavier": nn.init.xavier_uniform_, "xavier-normal": nn.init.xavier_normal_}


def apply_init(module: nn.Module, init: str = "default") -> nn.Module:
    """Re-initialise every Linear and Conv2d weight of ``module`` (biases zero).

    "default" leaves the model as built (timm's own init); "xavier" draws
    U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), "xavier-normal" N(0, 2 / (fan_in +
    fan_out)) as Algorithm 1 writes it. Norm layers and other parameters are untouched.
    """
    if init == "default":
        return module
    if init not in _INITS:
        raise MlfdError(f"unknown init {init!r}: choose default, {', '.join(_INITS)}")
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            _INITS[init](m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class LevelBackbone(nn.Module):
    """A timm classifier whose forward also returns its embeddings at L1..LK."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        info = getattr(model, "feature_info", None)
        if not info or not hasattr(model, "forward_intermediates"):
            raise MlfdError(
                f"{model.__class__.__name__} has no timm feature API (feature_info / "
                "forward_intermediates); choose another architecture"
            )
        self._stage_chs = [f["num_chs"] for f in info]

    @property
    def max_levels(self) -> int:
        return 1 + len(self._stage_chs)

    def check_levels(self, levels: int) -> None:
        if not 1 <= levels <= self.max_levels:
            raise MlfdError(
                f"--levels {levels} is outside 1..{self.max_levels} offered by "
                f"{self.model.__class__.__name__}"
            )

    def forward(self, x: torch.Tensor, levels: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (logits, [L1, ..., LK]) for K = ``levels`` (K = 0 gives no embeddings)."""
        if levels <= 1:
            feats = self.model.forward_features(x)
            embeds = []
        else:
            self.check_levels(levels)
            n = len(self._stage_chs)
            idx = list(range(n - levels + 1, n))  # ascending: L_K ... L2
            feats, inter = self.model.forward_intermediates(x, indices=idx, output_fmt="NCHW")
            embeds = [self._nchw(t, self._stage_chs[i]) for t, i in zip(inter, idx)][::-1]
        logits = self.model.forward_head(feats)
        if levels >= 1:
            embeds.insert(0, self.model.forward_head(feats, pre_logits=True))
        return logits, embeds

    @staticmethod
    def _nchw(t: torch.Tensor, chs: int) -> torch.Tensor:
        # Some timm families hand back NHWC maps; feature_info says how many channels to expect.
        if t.dim() == 4 and t.shape[1] != chs and t.shape[-1] == chs:
            t = t.permute(0, 3, 1, 2)
        return t


def level_shapes(backbone: LevelBackbone, input_size: int, levels: int,
                 in_chans: int = 3) -> list[tuple[int, ...]]:
    """Per-sample shapes of L1..LK for a square input, by one dummy forward in eval mode."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            p = next(backbone.parameters())
            x = torch.zeros(1, in_chans, input_size, input_size, device=p.device, dtype=p.dtype)
            _, embeds = backbone(x, levels)
    except RuntimeError as e:
        raise MlfdError(f"input size {input_size} does not fit this model: {e}") from None
    finally:
        backbone.train(was_training)
    return [tuple(e.shape[1:]) for e in embeds]


def build_level_backbone(entry, num_classes: int) -> LevelBackbone:
    """The backbone of a dataset entry of the experiment (teacher or student)."""
    model = create_backbone(entry.arch, num_classes, entry.input_size, entry.drop_rate,
                            entry.drop_path_rate, **entry.model_kwargs)
    return LevelBackbone(model)
