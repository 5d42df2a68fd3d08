"""Stages: plain functions taking a workspace and run options; the CLI only maps options."""

from .cache import cache_teachers
from .common import RunOptions
from .distill import distill
from .evaluate import evaluate
from .fuse import fuse
from .plan import plan_distill, run_distill
from .targets import cache_targets
from .teach import teach

__all__ = ["RunOptions", "cache_targets", "cache_teachers", "distill", "evaluate", "fuse",
           "plan_distill", "run_distill", "teach"]
