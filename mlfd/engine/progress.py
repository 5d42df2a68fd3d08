"""Rich progress bars on stderr with throughput; quiet when MLFD_NO_PROGRESS is set, and on
every torchrun rank but 0."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .distributed import is_main

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items (images, embeddings) per second of the task's ``items`` field."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        items = task.fields.get("items", 0)
        unit = task.fields.get("unit", "img")
        if elapsed <= 0 or not items:
            return Text(f"- {unit}/s", style="progress.data.speed")
        return Text(f"{items / elapsed:,.0f} {unit}/s", style="progress.data.speed")


class NameColumn(ProgressColumn):
    """The task's name, cut to a fixed width so a bar line fits 80 columns."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.width = width

    def render(self, task) -> Text:
        name = task.description
        if len(name) > self.width:
            name = name[: self.width - 1] + "…"
        return Text(name.ljust(self.width), style="bold")


def progress(out: Console | None = None, get_time=None) -> Progress:
    """Bars of at most 80 columns: name, bar, done/total, items/s, info, ETA. Outer bars
    advance fractionally within an epoch, so their ETA is known from the first updates."""
    disabled = bool(os.environ.get("MLFD_NO_PROGRESS")) or not sys.stderr.isatty() \
        or not is_main()  # under torchrun only rank 0 shows bars
    kw = {"get_time": get_time} if get_time is not None else {}
    return Progress(
        NameColumn(), BarColumn(bar_width=12), MofNCompleteColumn(), RateColumn(),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=out or console,
        disable=disabled and out is None, transient=False, expand=False,
        speed_estimate_period=3600.0, **kw)


def log(msg: str) -> None:
    if not is_main():  # under torchrun rank 0 speaks for every rank
        return
    console.print(msg, highlight=False, markup=False, soft_wrap=True)
