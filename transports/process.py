"""One object per process, made again after a fork: the helper behind every per-process singleton.

Celery's prefork pool forks the worker's main process. A connection, a file
descriptor or a thread made before the fork belongs to the parent: a child that
used it would share the parent's SQLite locks, inotify queue or pipe. Every
such object is therefore held by a :class:`PerProcess`, which makes it on first
use in each process and never hands a child its parent's::

    store = PerProcess(lambda: JobStore(url))
    store.get()     # made here on first use; a forked child makes its own

Standard library only, so both ``transports`` and ``cl_tasks`` use it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

_T = TypeVar("_T")


class _Pid:
    """This process's id, kept current across forks (``os.getpid()`` is a system call)."""

    def __init__(self) -> None:
        self.value = os.getpid()
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.value = os.getpid()


_pid = _Pid()


def current_pid() -> int:
    """This process's id, without a system call."""
    return _pid.value


class PerProcess(Generic[_T]):
    """A ``T`` made by ``make()`` on first use in each process (thread-safe)."""

    def __init__(self, make: Callable[[], _T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._lock_pid = _pid.value
        self._pid = 0
        self._value: _T | None = None

    def get(self) -> _T:
        """This process's object, made now if it has none yet."""
        value = self._value
        pid = _pid.value
        if value is not None and self._pid == pid:
            return value
        if self._lock_pid != pid:
            # A fork copies the lock in whatever state the parent's threads left it.
            self._lock, self._lock_pid = threading.Lock(), pid
        with self._lock:
            if self._value is None or self._pid != pid:
                self._value = self._make()
                self._pid = pid
            return self._value

    def peek(self) -> _T | None:
        """This process's object if it was made here, else None (never makes one)."""
        return self._value if self._pid == _pid.value else None

    def reset(self) -> None:
        """Forget this process's object; the next :meth:`get` makes a new one."""
        with self._lock:
            self._value = None
            self._pid = 0
