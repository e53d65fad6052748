"""Rich progress bars and console output shared by the stages."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def bar(unit: str) -> Progress:
    """A progress bar showing done/total, rate in ``unit``/s and ETA (rate kept in task field 'rate')."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9.1f} " + unit + "/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def say(message: str) -> None:
    console.print(message)
