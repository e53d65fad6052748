"""Rich progress bars and console output shared by the stages."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Columns when the output is not a terminal (a Ray job's log, CI, `| tee`) and COLUMNS is unset.
# Rich's default there is 80, which cut the quickstart's 13-column report table into 3-letter
# fragments stacked 7 lines deep (2026-12-07); at 200 it is one line per student.
LOG_WIDTH = 200


def make_console(stderr: bool = False) -> Console:
    """A rich console as wide as the terminal, or :data:`LOG_WIDTH` when writing to a file or pipe."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console


console = make_console(stderr=True)


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
