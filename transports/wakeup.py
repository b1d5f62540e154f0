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

from transports.process import PerProcess

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


class _Pipe:
    """The self-pipe that :func:`interrupt` writes to (one per process)."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)


_interrupt_pipe: PerProcess[_Pipe] = PerProcess(_Pipe)


def interrupt() -> None:
    """Wake every :meth:`CommitWatch.wait` of this process now (signal-handler safe)."""
    pipe = _interrupt_pipe.peek()  # never made here: nobody waits on a pipe not yet made
    if pipe is not None:
        with contextlib.suppress(BlockingIOError):
            os.write(pipe.write_end, b"!")


class _Inotify:
    """One process's inotify descriptor and its watch on the ``-wal`` file (-1 when absent)."""

    def __init__(self) -> None:
        self.fd = -1
        self.watch = -1
        if _LIBC is not None:
            self.fd = _LIBC.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if self.fd < 0:
                logger.warning("inotify unavailable (errno %d): polling", ctypes.get_errno())


class CommitWatch:
    """A file descriptor that wakes on writes to ``<database>-wal``, made per process."""

    def __init__(self, database: Path) -> None:
        self._wal = f"{database}-wal"
        # A forked child must not share its parent's inotify queue: it makes its own.
        self._inotify: PerProcess[_Inotify] = PerProcess(_Inotify)

    def fileno(self) -> int:
        """The inotify descriptor (``-1`` when inotify is unavailable)."""
        return self._ensure().fd

    def _ensure(self) -> _Inotify:
        inotify = self._inotify.get()
        if inotify.watch < 0 and inotify.fd >= 0 and _LIBC is not None and os.path.exists(self._wal):
            mask = IN_MODIFY | IN_CLOSE_WRITE | IN_DELETE_SELF
            inotify.watch = _LIBC.inotify_add_watch(inotify.fd, self._wal.encode(), mask)
        return inotify

    def drain(self) -> None:
        """Forget pending wake-ups (call before looking at the database)."""
        fd = self._ensure().fd
        if fd < 0:
            return
        try:
            while os.read(fd, _DRAIN_BYTES):
                pass
        except BlockingIOError:
            return

    def wait(self, timeout: float) -> str:
        """Block until a commit may have happened, :func:`interrupt` or ``timeout``.

        Returns ``"commit"``, ``"interrupt"`` or ``"timeout"``.
        """
        inotify = self._ensure()
        interrupt_fd = _interrupt_pipe.get().read_end
        watched = [interrupt_fd] if inotify.fd < 0 or inotify.watch < 0 else [inotify.fd, interrupt_fd]
        readable, _, _ = select.select(watched, [], [], timeout)
        if interrupt_fd in readable:
            return "interrupt"
        if readable:
            if not os.path.exists(self._wal):
                inotify.watch = -1  # watched again once the file is back
            return "commit"
        return "timeout"

    def close(self) -> None:
        inotify = self._inotify.peek()
        if inotify is not None and inotify.fd >= 0:
            os.close(inotify.fd)
        self._inotify.reset()
