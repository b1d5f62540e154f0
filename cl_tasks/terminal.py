"""Terminal output of ``cl-tasks``, drawn by rich: tables, a progress bar, colour only on a terminal.

On a terminal, tables are rich tables with coloured statuses and ``submit
--wait`` draws a progress bar with the elapsed time and an estimate of the time
left (rich's columns). Anywhere else (a pipe, a file, CI) there is no colour and
no redrawing: tables are plain aligned columns that are never wrapped, and
progress is one plain line per change (``progress 40%``), which scripts and logs
can read. ``NO_COLOR`` turns colour off on a terminal too (rich honours it).

A reader that goes away (``cl-tasks jobs | head -1``) ends the command quietly:
rich sends the rest of the output to ``/dev/null`` and exits 1, and click
(which runs every command) does the same for plain lines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

#: rich styles by job status.
STATUS_STYLES = {"completed": "green", "error": "red", "processing": "yellow", "queued": "cyan"}
#: Width given to output that is not a terminal: wide enough that no table row is wrapped.
PLAIN_WIDTH = 10_000

#: Called with a job's progress (0-100) and status while it is followed.
ProgressUpdate = Callable[[float, str], None]


class Terminal:
    """Writes human output to ``stream`` (stdout by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.console = Console(
            file=self.stream, highlight=False, width=None if self.tty else PLAIN_WIDTH, soft_wrap=False
        )

    def status(self, status: str) -> Text:
        return Text(status, style=STATUS_STYLES.get(status, ""))

    def line(self, text: str = "") -> None:
        """One line as it is: no markup, no wrapping (JSON goes out this way)."""
        print(text, file=self.stream, flush=True)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str | Text]]) -> None:
        """A table with a bold header row; cells are never wrapped off a terminal."""
        table = Table(
            box=box.SIMPLE_HEAD if self.tty else None,
            header_style="bold",
            pad_edge=False,
            show_edge=False,
        )
        for header in headers:
            table.add_column(header, no_wrap=not self.tty)
        for row in rows:
            table.add_row(*row)
        self._print(table)

    def fields(self, rows: Sequence[tuple[str, str | Text]]) -> None:
        """``name  value`` lines, names right-aligned (one job's columns)."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(justify="right", style="bold", no_wrap=True)
        grid.add_column(no_wrap=not self.tty)
        for name, value in rows:
            grid.add_row(name, value)
        self._print(grid)

    def _print(self, renderable: Table) -> None:
        if self.tty:
            self.console.print(renderable)
            return
        # Off a terminal rich pads every line to the table's width: drop that padding.
        with self.console.capture() as captured:
            self.console.print(renderable)
        for line in captured.get().splitlines():
            self.line(line.rstrip())

    @contextmanager
    def progress(self, label: str) -> Iterator[ProgressUpdate]:
        """A progress bar of ``label`` for the block (plain ``progress N%`` lines off a terminal)."""
        if not self.tty:
            yield self._plain_progress()
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console) as bar:
            task = bar.add_task(label, total=100.0)

            def update(percent: float, status: str) -> None:
                done = max(0.0, min(100.0, percent))
                bar.update(task, completed=done, description=f"{label} {status}")

            yield update

    def _plain_progress(self) -> ProgressUpdate:
        last: list[int] = []

        def update(percent: float, status: str) -> None:
            value = int(max(0.0, min(100.0, percent)))
            if not last or last[-1] != value:
                last.append(value)
                self.line(f"progress {value}%")

        return update
