"""The multi-level KD loss (paper Eq. 3, design §4) behind one backend interface.

    L = g*CE(y, s) + a*T^2*softCE(softmax(t/T), log_softmax(s/T)) + sum_k b_k*MSE(u_k, v_k)

Every backend takes the same arguments and returns ``(loss, terms)``: ``loss`` is the
differentiable total, ``terms`` maps names to the *weighted* contributions, detached,
for logging (``ce``, ``kd``, ``mse_L1`` ... ``mse_LK``); they sum to ``loss``.
A label of ``IGNORE_INDEX`` (-100) drops that row from the CE term and its mean, as in
``F.cross_entropy``; the KD and feature terms still average over all B rows.
Backends: ``torch`` (the reference and test oracle), ``compile`` (torch.compile of
it) and ``triton`` (the fused kernel in ``mlfd_kernels``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import MlfdError

IGNORE_INDEX = -100  # F.cross_entropy's default; the fused kernel mirrors it


@dataclass(frozen=True)
class KDLossConfig:
    ce_weight: float = 1.0  # g
    soft_weight: float = 1.0  # a
    temperature: float = 2.0  # T
    level_weights: tuple[float, ...] = field(default_factory=tuple)  # b_1..b_K
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise MlfdError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise MlfdError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")


def term_names(num_levels: int) -> list[str]:
    return ["ce", "kd"] + [f"mse_L{k + 1}" for k in range(num_levels)]


def _check(student_logits, teacher_logits, labels, student_feats, teacher_feats, cfg):
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise MlfdError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must both be (B, C)"
        )
    if labels.shape != student_logits.shape[:1]:
        raise MlfdError(f"labels {tuple(labels.shape)} do not match batch {student_logits.shape[0]}")
    if len(student_feats) != len(teacher_feats) or len(student_feats) != len(cfg.level_weights):
        raise MlfdError(
            f"{len(student_feats)} student levels, {len(teacher_feats)} teacher levels and "
            f"{len(cfg.level_weights)} level weights must agree"
        )
    for k, (u, v) in enumerate(zip(student_feats, teacher_feats)):
        if u.shape[0] != student_logits.shape[0] or u[0].numel() != v[0].numel() or u.shape[0] != v.shape[0]:
            raise MlfdError(f"level L{k + 1}: student {tuple(u.shape)} vs teacher {tuple(v.shape)}")


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_feats: Sequence[torch.Tensor],
    teacher_feats: Sequence[torch.Tensor],
    cfg: KDLossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pure-PyTorch reference; computes in the inputs' dtype promoted to at least fp32."""
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(acc)
    t = teacher_logits.detach().to(acc)
    T = cfg.temperature
    terms: dict[str, torch.Tensor] = {}
    terms["ce"] = cfg.ce_weight * F.cross_entropy(s, labels, ignore_index=IGNORE_INDEX,
                                                  label_smoothing=cfg.label_smoothing)
    p_t = F.softmax(t / T, dim=1)
    soft_ce = -(p_t * F.log_softmax(s / T, dim=1)).sum(dim=1).mean()
    terms["kd"] = cfg.soft_weight * T * T * soft_ce
    for k, (u, v, b) in enumerate(zip(student_feats, teacher_feats, cfg.level_weights)):
        u2 = u.reshape(u.shape[0], -1).to(acc)
        v2 = v.detach().reshape(v.shape[0], -1).to(acc)
        terms[f"mse_L{k + 1}"] = b * F.mse_loss(u2, v2)
    loss = torch.stack(list(terms.values())).sum()
    return loss, {k: v.detach() for k, v in terms.items()}


_compiled: Callable | None = None


def _kd_loss_compiled(*args):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(kd_loss_reference, dynamic=False)
    return _compiled(*args)


def _kd_loss_triton(*args):
    from mlfd_kernels.kd_loss import kd_loss_triton  # imported lazily: needs triton

    return kd_loss_triton(*args)


BACKENDS: dict[str, Callable] = {
    "torch": kd_loss_reference,
    "compile": _kd_loss_compiled,
    "triton": _kd_loss_triton,
}


def triton_available() -> bool:
    try:
        import mlfd_kernels.kd_loss  # noqa: F401
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> str:
    """Validate a backend for ``device``; ``auto`` is the reference here.

    Importing is no proof that the kernel runs on a given GPU: on CUDA, mlfd.fastpaths
    upgrades ``auto`` to the fastest backend that passed its check (`mlfd info --check`).
    """
    name = (name or "auto").lower()
    if name == "auto":
        return "torch"
    if name not in BACKENDS:
        raise MlfdError(f"unknown loss backend {name!r}: choose auto, {', '.join(BACKENDS)}")
    if name == "triton" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise MlfdError("--loss-backend triton needs a CUDA device (or TRITON_INTERPRET=1)")
    if name == "triton" and not triton_available():
        raise MlfdError("--loss-backend triton: triton or mlfd_kernels is not importable")
    return name


def kd_loss(
    student_logits, teacher_logits, labels, student_feats, teacher_feats, cfg: KDLossConfig,
    backend: str = "torch",
):
    _check(student_logits, teacher_logits, labels, student_feats, teacher_feats, cfg)
    return BACKENDS[backend](student_logits, teacher_logits, labels, list(student_feats),
                             list(teacher_feats), cfg)
