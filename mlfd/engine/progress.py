"""Rich progress bars on stderr with throughput; quiet when MLFD_NO_PROGRESS is set."""

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
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

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


def progress() -> Progress:
    disabled = bool(os.environ.get("MLFD_NO_PROGRESS")) or not sys.stderr.isatty()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, disable=disabled, transient=False,
    )


def log(msg: str) -> None:
    console.print(msg, highlight=False, markup=False, soft_wrap=True)
