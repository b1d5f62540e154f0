"""A finer wait for SQLite's write lock than its own busy timeout.

When a connection finds the write lock taken, SQLite's default busy handler
sleeps 1, 2, 5, 10, 15, 20, 25, ... ms between tries. Our write transactions
hold the lock for tens of microseconds, so under contention (a worker's main
process and its pool processes all write) most of those sleeps are spent with
the lock free: a task that met one busy lock started 1 to 8 ms late.

:class:`Connection` is a ``sqlite3.Connection`` whose busy handler retries after
50 µs, then 0.1, 0.2 and 0.5 ms, and every 1 ms from the 40th try on, until the
connection's ``timeout`` has passed (then SQLite raises "database is locked" as
before). It is installed through the C library's ``sqlite3_busy_handler``,
reached with ``ctypes`` on the library the ``sqlite3`` module itself is linked
to. Where that cannot be done safely (a build that hides the symbols, or a
``sqlite3.Connection`` laid out differently than expected: checked by asking the
handle for its file name) the connection keeps SQLite's default handler, which
is correct, only coarser; it is logged once.

Use it as ``sqlite3.connect(path, timeout=..., factory=Connection)``.
"""

from __future__ import annotations

import _sqlite3
import ctypes
import logging
import os
import sqlite3
import time
from typing import Any

logger = logging.getLogger(__name__)

#: Sleeps (seconds) between the first tries; after them, :data:`LATE_SLEEP` each.
EARLY_SLEEPS = (0.00005,) * 4 + (0.0001,) * 8 + (0.0002,) * 12 + (0.0005,) * 16
LATE_SLEEP = 0.001

_BUSY_HANDLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)


def _load_library() -> ctypes.CDLL | None:
    """The SQLite library of the ``sqlite3`` module, if its functions can be called."""
    try:
        library = ctypes.CDLL(_sqlite3.__file__)
        library.sqlite3_libversion.restype = ctypes.c_char_p
        if library.sqlite3_libversion().decode() != sqlite3.sqlite_version:
            return None
        library.sqlite3_db_filename.restype = ctypes.c_char_p
        library.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        library.sqlite3_busy_handler.argtypes = [ctypes.c_void_p, _BUSY_HANDLER, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return library


_LIBRARY = _load_library()
_warned: list[bool] = []


def _handle(conn: sqlite3.Connection, path: str) -> int | None:
    """The ``sqlite3 *`` of ``conn`` (the first field after the object header), checked."""
    if _LIBRARY is None or path in ("", ":memory:"):
        return None
    pointer = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
    if not pointer:
        return None
    name = _LIBRARY.sqlite3_db_filename(pointer, b"main")
    if name is None or os.path.realpath(name.decode()) != os.path.realpath(path):
        return None
    return int(pointer)


class Connection(sqlite3.Connection):
    """A connection that waits for a busy write lock in steps of 50 µs to 1 ms."""

    def __init__(self, database: Any, timeout: float = 5.0, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, timeout, *args, **kwargs)
        self._timeout = timeout
        self._busy_since = 0.0
        # Kept on the connection: SQLite holds only a pointer to it.
        self._busy_handler = _BUSY_HANDLER(self._on_busy)
        handle = _handle(self, os.fsdecode(database))
        if handle is None:
            if not _warned and str(database) != ":memory:":
                _warned.append(True)
                logger.info("SQLite: finer busy waits unavailable here; SQLite's own busy timeout is used")
            return
        _LIBRARY.sqlite3_busy_handler(handle, self._busy_handler, None)  # type: ignore[union-attr]

    def _on_busy(self, _arg: Any, tries: int) -> int:
        """SQLite's busy callback: sleep a little and try again (1), or give up (0)."""
        now = time.monotonic()
        if tries == 0:
            self._busy_since = now
        elif now - self._busy_since >= self._timeout:
            return 0
        time.sleep(EARLY_SLEEPS[tries] if tries < len(EARLY_SLEEPS) else LATE_SLEEP)
        return 1
