"""What users see in a terminal: bars with images/s and a working ETA, an 80-column table."""

import io

from rich.console import Console

from mlfd.engine.progress import progress
from mlfd.report import rich_table


def test_results_table_fits_80_columns_without_wrapping():
    rows = [
        dict(dataset="fashion-mnist-mini", model="teacher", arch="test_convnext", levels=None,
             status="complete", top1=0.78, top5=0.997),
        dict(dataset="fashion-mnist-mini", model="multi-head", arch="test_efficientnet",
             levels=None, status="complete", top1=0.76, top5=0.99),
        dict(dataset="fashion-mnist-mini", model="student", arch="test_convnext", levels=2,
             status="complete", top1=0.815, top5=1.0),
        dict(dataset="animal-mnist-mini", model="joint", arch="joint", levels=2,
             status="stale", top1=0.5, top5=None),
        dict(dataset="animal-mnist-mini", model="student", arch="test_vit", levels=2,
             status="incomplete", epoch=3, epochs=8, top1=None, top5=None),
    ]
    out = Console(file=io.StringIO(), width=80)
    out.print(rich_table(rows))
    lines = out.file.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    body = [line for line in lines if "-mnist-mini" in line]
    assert len(body) == len(rows)  # one line per row: nothing wrapped
    assert "+3.50" in body[2] and "100.00" in body[2]  # 81.5 - 78.0, computed
    assert "n/a" in body[3] and "stale" in body[3]
    assert "incomplete 3/8" in body[4] and "—" in body[4]
    assert not any("…" in line for line in body[:1] + body[2:])  # the names shown whole


def test_outer_bar_has_a_rate_and_an_eta_within_80_columns():
    """The epoch bar advances within an epoch, so its ETA and images/s are known from the
    first updates (a fake clock: 10 s per tenth of an epoch, 64 images each)."""
    clock = {"t": 0.0}
    out = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    with progress(out, get_time=lambda: clock["t"]) as prog:
        task = prog.add_task("distill fashion-mnist-mini L2 epochs", total=4, items=0, info="",
                             unit="img")
        for i in range(1, 4):
            clock["t"] += 10.0
            prog.update(task, completed=i / 10, items=64 * i, info="top1 0.5")
        t = prog.tasks[0]
        # speed from the updates' deltas: 0.1 epoch per 10 s; (4 - 0.3) / 0.01 = 370 s
        assert t.time_remaining is not None and abs(t.time_remaining - 370.0) <= 1.0
        prog.refresh()
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.file.getvalue())  # cursor codes
    last = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert "0:06:1" in last  # the ETA is shown
    assert "6 img/s" in last  # 192 images in 30 s
    assert max(len(line) for line in text.replace("\r", "\n").splitlines()) <= 80
