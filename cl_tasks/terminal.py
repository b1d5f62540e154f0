"""Terminal output of ``cl-tasks``: tables, a progress bar, colour only on a terminal.

Colour and the redrawn progress bar are used only when the stream is a TTY and
``NO_COLOR`` is unset; otherwise progress is printed as plain lines
(``progress 40%``), one per change, which scripts and logs can read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

#: ANSI colours by job status.
STATUS_COLOURS = {"completed": "32", "error": "31", "processing": "33", "queued": "36"}
#: Width of the progress bar in characters.
BAR_WIDTH = 30


class Terminal:
    """Writes human output to ``stream``."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.colour = self.tty and "NO_COLOR" not in os.environ
        self._last_progress: int | None = None

    def paint(self, text: str, code: str | None) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and code else text

    def status(self, status: str) -> str:
        return self.paint(status, STATUS_COLOURS.get(status))

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """Aligned columns; colour codes do not count towards the widths."""
        plain = [[_strip(cell) for cell in row] for row in rows]
        widths = [max([len(header)] + [len(row[i]) for row in plain]) for i, header in enumerate(headers)]
        header = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
        self.line(self.paint(header, "1"))
        for row, bare in zip(rows, plain, strict=True):
            cells = [
                cell + " " * (width - len(text)) for cell, text, width in zip(row, bare, widths, strict=True)
            ]
            self.line("  ".join(cells).rstrip())

    def progress(self, percent: float, label: str = "") -> None:
        value = int(max(0.0, min(100.0, percent)))
        if value == self._last_progress:
            return
        self._last_progress = value
        if not self.tty:
            self.line(f"progress {value}%")
            return
        filled = BAR_WIDTH * value // 100
        bar = self.paint("#" * filled, "32") + "." * (BAR_WIDTH - filled)
        self.stream.write(f"\r[{bar}] {value:3d}% {label}")
        self.stream.flush()

    def end_progress(self) -> None:
        if self.tty and self._last_progress is not None:
            self.stream.write("\n")
        self._last_progress = None


def _strip(text: str) -> str:
    while "\x1b[" in text:
        start = text.index("\x1b[")
        end = text.index("m", start)
        text = text[:start] + text[end + 1 :]
    return text
