"""bench/accuracy.py: mean ± std over seeds, only complete results, same-arch baselines."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "accuracy", Path(__file__).resolve().parents[1] / "bench" / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(accuracy)


def _row(dataset, model, top1, arch="a", levels=None, status="complete", top5=None):
    return dict(dataset=dataset, model=model, arch=arch, levels=levels, status=status,
                top1=top1, top5=top5)


def test_aggregate_by_hand():
    seeds = [
        {"rows": [_row("d", "teacher", 0.50), _row("d", "student", 0.60, levels=2, top5=0.9),
                  _row("d", "multi-head", 0.40, arch="a"), _row("d", "multi-head", 0.1, arch="b"),
                  _row("d", "student", None, levels=1, status="incomplete")]},
        {"rows": [_row("d", "teacher", 0.54), _row("d", "student", 0.64, levels=2, top5=0.8),
                  _row("d", "multi-head", 0.44, arch="a"),
                  _row("d", "student", 0.99, levels=1, status="stale")]},
    ]
    agg = accuracy.aggregate(seeds)["d"]
    assert agg["teacher (a)"]["top1_mean"] == pytest.approx(52.0)
    # sample std of (50, 54) = sqrt(((-2)^2 + 2^2) / 1) = 2.828...
    assert agg["teacher (a)"]["top1_std"] == pytest.approx(8 ** 0.5)
    assert agg["student L2"]["top5_mean"] == pytest.approx(85.0)
    assert agg["multi-head (b)"]["n_seeds"] == 1 and agg["multi-head (b)"]["top1_std"] == 0.0
    assert "student L1" not in agg  # neither incomplete nor stale results count
    table = accuracy.markdown({"d": agg}, seeds, [2])
    assert "| MLFD student L2 | 62.00 ± 2.83 |" in table
    assert "| multi-head (same arch) | 42.00 ± 2.83 |" in table  # arch a, not b
    assert "| joint-head (same arch) | — |" in table
    seeds[0]["rows"].append(_row("d", "joint-head", 0.3))  # in one of the two seeds only
    table = accuracy.markdown({"d": accuracy.aggregate(seeds)["d"]}, seeds, [2])
    assert "| joint-head (same arch) | 30.00 (n=1) |" in table
