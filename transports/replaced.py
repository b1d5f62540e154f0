"""A database file replaced or deleted under open connections: noticed, said once, reconnected.

An SQLite connection holds the file it opened, not its path. When ``media_store.db``
is replaced (a restore, ``mv fresh.db media_store.db``) or deleted and made again
(the API's migrations on a new file), every open connection goes on with the old
file: nothing fails, nothing is logged, and no new job is ever seen. So each process
looks at the path's (device, inode) at most every :data:`CHECK_EVERY` seconds, on the
next use of a connection (one ``stat``; an idle worker's consumer looks on every
poll), and:

* **replaced** (another inode): logs ``<path> was replaced (inode A → B);
  reconnecting`` and raises its :meth:`Watch.generation`; every store on the file in
  this process (the broker's :class:`transports.store.Store`, the jobs table's
  ``cl_tasks.jobs.JobStore``) sees the new generation and makes new connections;
* **deleted**: logs ``<path> was deleted; waiting for it`` and keeps the old
  connections (they still work, on a file nobody else sees) until a file is back at
  the path, then logs the reconnect as above. A new database is never made in its
  place by us: the API's migrations make it.

Each change is logged once per worker: at WARNING by the process that imported this
module first (the worker's main process), at DEBUG by its forked pool processes,
which reconnect on their own next use.

While the file is missing, no new connection is made (:class:`DatabaseGone`): SQLite
would create an empty file at the path, which is the API's to make.

Old connections are abandoned, never closed (:func:`abandon`): when SQLite closes the
last connection of a WAL database it checkpoints and deletes ``<path>-wal`` *by
name*, which is now the new database's log, so closing an old connection could
delete the API's latest commits. Python 3.11's ``sqlite3`` cannot switch that off
(``SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`` arrived in 3.12), so each abandoned connection
keeps one reference forever: a few descriptors per replacement, for the life of the
process. A file replaced with its old ``-wal``/``-shm`` left beside it is unsafe for
every program (SQLite would apply the old log to the new file): remove them with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from transports.process import PerProcess, current_pid

logger = logging.getLogger(__name__)

#: Seconds between two looks at a database path's inode (per process).
CHECK_EVERY = 0.5
#: The process that imported this module first: the worker's main process.
_MAIN_PID = os.getpid()

Identity = tuple[int, int]


def _identity(path: Path) -> Identity | None:
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (info.st_dev, info.st_ino)


class Watch:
    """The identity of one database path as this process last saw it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen = _identity(path)
        #: The file this process's connections are on (None until one was seen).
        self._connected = self._seen
        self._next = time.monotonic() + CHECK_EVERY
        self._generation = 0

    def generation(self) -> int:
        """Bumped each time the path leads to another file than the connections were made on."""
        now = time.monotonic()
        if now < self._next:
            return self._generation
        with self._lock:
            if now >= self._next:
                self._next = now + CHECK_EVERY
                self._look()
        return self._generation

    def gone(self) -> bool:
        """Whether the file is missing now, after one was there (looked at now: called before connecting)."""
        with self._lock:
            self._next = time.monotonic() + CHECK_EVERY
            self._look()
            return self._seen is None and self._connected is not None

    def _look(self) -> None:
        seen = _identity(self.path)
        if seen == self._seen:
            return
        self._seen = seen
        log = logger.warning if current_pid() == _MAIN_PID else logger.debug
        if seen is None:
            log("%s was deleted; waiting for it (its old connections go on until a file is back)", self.path)
            return
        if self._connected is None:
            self._connected = seen  # made after the first look (the broker creates it): ours already
            return
        if seen != self._connected:
            log("%s was replaced (inode %d → %d); reconnecting", self.path, self._connected[1], seen[1])
            self._connected = seen
            self._generation += 1


class DatabaseGone(sqlite3.OperationalError):
    """Raised instead of connecting while the database file is deleted (an ``OperationalError``:
    kombu and Celery retry it as a lost connection)."""


_watches: PerProcess[dict[str, Watch]] = PerProcess(dict)
_watches_lock = threading.Lock()


def watch(path: Path) -> Watch:
    """This process's :class:`Watch` of ``path`` (one per path, shared by every store on it)."""
    key = os.path.abspath(path)
    watches = _watches.get()
    found = watches.get(key)
    if found is None:
        with _watches_lock:
            found = watches.setdefault(key, Watch(Path(key)))
    return found


def abandon(connection: object) -> None:
    """Keep ``connection`` open for the life of the process, never closed (see the module docstring)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(connection))
