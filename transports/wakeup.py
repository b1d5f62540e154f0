"""Waiting for commits to the database without polling it.

Every commit in WAL mode writes to the ``-wal`` file, so an inotify watch on
that file makes a file descriptor that becomes readable on every commit by any
process, at no cost while nothing happens. :class:`CommitWatch` wraps it
(through ``ctypes``: the stdlib has no inotify). Where inotify is missing (not
Linux, or a filesystem without it) :meth:`CommitWatch.wait` just sleeps for the
timeout, and the caller's ``polling_interval`` becomes the wake-up latency.

A wake-up only says "something may have changed": the caller confirms with
``PRAGMA data_version`` before it queries.

:func:`interrupt` (safe in a signal handler) wakes every waiter of the process
at once, so a worker asked to shut down does not sit out its drain timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
from pathlib import Path

logger = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_DELETE_SELF = 0x00000400
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
#: Bytes read per drain of the inotify descriptor (many 16-byte events).
_DRAIN_BYTES = 64 * 1024


def _load_inotify() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    if not hasattr(libc, "inotify_init1"):
        return None
    return libc


_LIBC = _load_inotify()
_interrupt_pipe: tuple[int, int, int] | None = None  # (pid, read end, write end)


def _interrupt_fd() -> int:
    global _interrupt_pipe  # noqa: PLW0603 - one pipe per process
    if _interrupt_pipe is None or _interrupt_pipe[0] != os.getpid():
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _interrupt_pipe = (os.getpid(), read_end, write_end)
    return _interrupt_pipe[1]


def interrupt() -> None:
    """Wake every :meth:`CommitWatch.wait` of this process now (signal-handler safe)."""
    if _interrupt_pipe is not None and _interrupt_pipe[0] == os.getpid():
        with contextlib.suppress(BlockingIOError):
            os.write(_interrupt_pipe[2], b"!")


class CommitWatch:
    """A file descriptor that wakes on writes to ``<database>-wal``, made per process."""

    def __init__(self, database: Path) -> None:
        self._wal = f"{database}-wal"
        self._fd = -1
        self._watch = -1
        self._pid = 0

    def fileno(self) -> int:
        """The inotify descriptor (``-1`` when inotify is unavailable)."""
        self._ensure()
        return self._fd

    def _ensure(self) -> None:
        if self._pid == os.getpid() and self._watch >= 0:
            return
        if self._pid != os.getpid():
            # The parent's descriptor is shared with it after a fork: make our own.
            self._fd = -1
            self._pid = os.getpid()
            if _LIBC is not None:
                self._fd = _LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
                if self._fd < 0:
                    logger.warning("inotify unavailable (errno %d): polling", ctypes.get_errno())
        if self._fd >= 0 and _LIBC is not None and os.path.exists(self._wal):
            mask = IN_MODIFY | IN_CLOSE_WRITE | IN_DELETE_SELF
            self._watch = _LIBC.inotify_add_watch(self._fd, self._wal.encode(), mask)

    def drain(self) -> None:
        """Forget pending wake-ups (call before looking at the database)."""
        if self._fd < 0:
            return
        try:
            while os.read(self._fd, _DRAIN_BYTES):
                pass
        except BlockingIOError:
            return

    def wait(self, timeout: float) -> str:
        """Block until a commit may have happened, :func:`interrupt` or ``timeout``.

        Returns ``"commit"``, ``"interrupt"`` or ``"timeout"``.
        """
        self._ensure()
        interrupt_fd = _interrupt_fd()
        watched = [interrupt_fd] if self._fd < 0 or self._watch < 0 else [self._fd, interrupt_fd]
        readable, _, _ = select.select(watched, [], [], timeout)
        if interrupt_fd in readable:
            return "interrupt"
        if readable:
            self._rewatch_if_deleted()
            return "commit"
        return "timeout"

    def _rewatch_if_deleted(self) -> None:
        if not os.path.exists(self._wal):
            self._watch = -1

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._watch = -1
        self._pid = 0
