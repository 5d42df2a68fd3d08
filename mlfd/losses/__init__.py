from .kd import BACKENDS, KDLossConfig, kd_loss, kd_loss_reference, resolve_backend, term_names

__all__ = ["BACKENDS", "KDLossConfig", "kd_loss", "kd_loss_reference", "resolve_backend", "term_names"]
