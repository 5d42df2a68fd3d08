"""Replayable AutoAugment: the ImageNet policy and its per-sample decisions.

AutoAugment (Cubuk et al. 2019) gives each image one sub-policy chosen uniformly from
the policy; a sub-policy is two steps (op, probability, magnitude bin) applied in order,
each firing with its probability, and a signed op negates its magnitude with probability
1/2. The table and the magnitude ranges are those of the paper's ImageNet policy as
torchvision's ``v2.AutoAugment`` defines them: 10 bins (0-9), bin b of a range
``(0, max)`` being ``max * b / 9``.

Every random decision is drawn here, on the host, from the counter-based RNG of
views.py keyed by (seed, sample index, view id), so a decision never depends on the
batch a sample lands in or on the order of the pass. :func:`draw` makes the decisions,
:func:`resolve` turns them into concrete steps (op, parameter) at the augmented image's
size, and each backend applies those steps: pipelines/torch_pipeline.py with
torchvision's functional ops, pipelines/dali_augment.py with DALI operators built to
the same arithmetic. A view > 0 thus replays exactly in any run, stage and backend;
view 0 (the clean view) is never augmented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .views import counter_uniform

FILL = 128  # grey, as the AutoAugment reference implementation pads geometric ops
TRANSLATE = 150.0 / 331.0  # largest translation, as a fraction of the image size
NUM_BINS = 10

OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
GEOMETRIC = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
ENHANCE = frozenset({"Brightness", "Color", "Contrast", "Sharpness"})  # factor 1 + signed magnitude
_MAX = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": TRANSLATE, "TranslateY": TRANSLATE,
        "Rotate": 30.0, **{op: 0.9 for op in ENHANCE}}  # signed ops: magnitude range (0, max)

# A policy: sub-policies of two (op, probability, magnitude bin or None) steps.
Step = tuple[str, float, int | None]
Policy = Sequence[tuple[Step, Step]]

IMAGENET: Policy = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
POLICIES: dict[str, Policy] = {"imagenet": IMAGENET}

# counter_uniform streams; views.py and the pipelines hold 0-4 and 101, and 202 seeded
# the earlier, non-replayable AutoAugment: keep it retired so old and new draws differ.
SUB_POLICY_STREAM = 203
FIRE_STREAMS = (204, 205)
NEGATE_STREAMS = (206, 207)


def policy_table(policy: str | Policy) -> Policy:
    return POLICIES[policy] if isinstance(policy, str) else policy


@dataclass(frozen=True)
class Decisions:
    """The random choices of each sample (arrays over samples; ``[:, j]`` is step j)."""

    active: np.ndarray  # (n,) bool: view > 0, so the sample is augmented
    sub_policy: np.ndarray  # (n,) int64 index into the policy
    fire: np.ndarray  # (n, 2) bool: step j is applied (always False where not active)
    negate: np.ndarray  # (n, 2) bool: a signed step uses its negated magnitude


def draw(policy: str | Policy, seed: int, index, view) -> Decisions:
    """Decisions of each (index, view): a pure function of (seed, index, view)."""
    table = policy_table(policy)
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    view = np.asarray(view, dtype=np.int64).reshape(-1)
    active = view > 0
    u = counter_uniform(seed, index, view, SUB_POLICY_STREAM)
    sub = np.minimum((u * len(table)).astype(np.int64), len(table) - 1)
    prob = np.array([[step[1] for step in sp] for sp in table], dtype=np.float64)[sub]
    fire = np.stack([counter_uniform(seed, index, view, s) for s in FIRE_STREAMS], 1) < prob
    negate = np.stack([counter_uniform(seed, index, view, s) for s in NEGATE_STREAMS], 1) < 0.5
    return Decisions(active=active, sub_policy=sub, fire=fire & active[:, None], negate=negate)


@dataclass(frozen=True)
class Steps:
    """What each sample goes through: ``op[:, j]`` indexes OPS (-1: step j does nothing).

    ``param`` is the op's argument: degrees (Rotate), shear factor (Shear*), whole pixels
    (Translate*), enhance factor (Brightness, Color, Contrast, Sharpness), bits
    (Posterize), threshold (Solarize, a float32 value); 0 for the others.
    """

    active: np.ndarray  # (n,) bool
    op: np.ndarray  # (n, 2) int64
    param: np.ndarray  # (n, 2) float64


def op_parameter(op: str, magnitude_bin: int | None, negate, height: int, width: int) -> np.ndarray:
    """The argument of ``op`` at ``magnitude_bin`` for each sample's sign (torchvision's ranges)."""
    negate = np.asarray(negate, dtype=bool)
    if op not in OPS:
        raise ValueError(f"unknown AutoAugment op {op!r}")
    if op in ("AutoContrast", "Equalize", "Invert"):
        return np.zeros(negate.shape)
    frac = magnitude_bin / (NUM_BINS - 1)
    if op == "Posterize":
        return np.full(negate.shape, float(round(8 - 4 * frac)))
    if op == "Solarize":
        return np.full(negate.shape, float(np.float32(255.0 * (1.0 - frac))))
    m = np.where(negate, -1.0, 1.0) * _MAX[op] * frac
    if op in ENHANCE:
        return 1.0 + m
    if op == "TranslateX":
        return np.trunc(m * width)  # torchvision translates by int(magnitude) pixels
    if op == "TranslateY":
        return np.trunc(m * height)
    return m


def resolve(policy: str | Policy, decisions: Decisions, height: int, width: int) -> Steps:
    """Concrete steps for images of ``height`` x ``width`` (translations scale with the size)."""
    table = policy_table(policy)
    n = len(decisions.active)
    op = np.full((n, 2), -1, dtype=np.int64)
    param = np.zeros((n, 2))
    for k, sub_policy in enumerate(table):
        rows = np.flatnonzero(decisions.sub_policy == k)
        for j, (name, _, magnitude_bin) in enumerate(sub_policy):
            fired = rows[decisions.fire[rows, j]]
            op[fired, j] = OPS.index(name)
            param[fired, j] = op_parameter(name, magnitude_bin, decisions.negate[fired, j],
                                           height, width)
    return Steps(active=decisions.active.copy(), op=op, param=param)


def plan(policy: str | Policy, seed: int, index, view, height: int, width: int) -> Steps:
    """:func:`draw` then :func:`resolve`: the steps of each (index, view)."""
    return resolve(policy, draw(policy, seed, index, view), height, width)


def inverse_affine(op: np.ndarray, param: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, 2, 3) maps from output to input pixel coordinates of the geometric steps.

    Coordinates put pixel (i, j) on [j, j+1) x [i, i+1) (DALI's warp convention, and
    torchvision's grid with ``align_corners=False``). The maps are the ones torchvision's
    ``F.rotate`` (about the image centre, counter-clockwise for positive degrees) and
    ``F.affine`` (shear about the top-left corner, translation in pixels) build as
    v2.AutoAugment calls them; non-geometric steps get the identity.
    """
    op = np.asarray(op).reshape(-1)
    param = np.asarray(param, dtype=np.float64).reshape(-1)
    m = np.zeros((len(op), 2, 3))
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    is_op = {name: op == OPS.index(name) for name in GEOMETRIC}
    m[is_op["ShearX"], 0, 1] = param[is_op["ShearX"]]  # x_in = x + s * y
    m[is_op["ShearY"], 1, 0] = param[is_op["ShearY"]]  # y_in = y + s * x
    m[is_op["TranslateX"], 0, 2] = -param[is_op["TranslateX"]]
    m[is_op["TranslateY"], 1, 2] = -param[is_op["TranslateY"]]
    rot = is_op["Rotate"]
    a = np.radians(param[rot])
    c, s = np.cos(a), np.sin(a)
    cx, cy = width / 2.0, height / 2.0
    m[rot] = np.stack([np.stack([c, -s, cx - c * cx + s * cy], 1),
                       np.stack([s, c, cy - s * cx - c * cy], 1)], 1)
    return m


def shear_degrees(factor: float) -> float:
    """torchvision's ``F.affine`` takes a shear angle; AutoAugment's magnitude is its tangent."""
    return math.degrees(math.atan(factor))
