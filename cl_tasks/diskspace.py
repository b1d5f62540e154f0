"""A job's file write refused because the disk is full: the job waits, then goes on.

A full disk is the operator's to fix, not the job's fault (README, "A full disk stops
writes, not workers"), so no job ends ``error`` for it. Writes of the database already
wait (:func:`cl_tasks.execution.written`); this module covers the job's *files*:

* **The worker's own writes** (staging an input into the runner's scratch folder,
  placing an output: temporary name, then rename) are tried again, the same step,
  after a pause (:func:`when_space`); what a failed try wrote is removed first.
* **A runner's writes** (``RUNNER_CONFINEMENT=off``, where it writes the real paths,
  or a runner whose scratch folder is full) come back as an error line with
  ``"errno": "ENOSPC"`` (or ``"EDQUOT"``, a quota) in the runner protocol
  (:class:`cl_tasks.runner.RunnerDiskFull`); the job is then run again by the runner
  after a pause, because only the runner knows how to redo its own write.

Pauses start at :data:`FIRST_PAUSE` and double up to :data:`LONGEST_PAUSE`: a disk
that fills for hours costs a try every half minute, a short squeeze costs seconds.
Each wait of a job logs ONE error line saying what could not be written and where to
free space (``cannot write … the disk is full; free space on the filesystem of
<folder>``), and one info line when it went through; the tries between stay quiet.

The message stays unacked and the job's lease is renewed while it waits (the lease
thread runs on), so nobody takes it over; if the database is on the same disk its
renewals fail too and the job may run twice once space is back (as the README says).
A time limit (Celery's ``soft_time_limit`` / ``time_limit``, or a per-job limit) counts
the wait: it is wall-clock time of the task, which Celery's pool cannot pause.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

logger = logging.getLogger(__name__)

#: errno values that mean "no room to write": the disk is full, or a quota is used up.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: The same, by name, as a runner reports them in its error line (``"errno": "ENOSPC"``).
DISK_FULL_NAMES = frozenset(errno.errorcode[number] for number in DISK_FULL_ERRNOS)
#: Seconds of the first pause of a wait for space.
FIRST_PAUSE = 1.0
#: Seconds of the longest pause between two tries (pauses double up to it).
LONGEST_PAUSE = 30.0

_T = TypeVar("_T")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused for lack of space (ENOSPC or EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def existing_folder(path: str) -> str:
    """The nearest folder of ``path`` that exists (the one whose filesystem to name)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder


def fullest(folders: Iterable[str]) -> str:
    """Of ``folders``, the one on the filesystem with the least room left."""

    def room(folder: str) -> int:
        try:
            info = os.statvfs(folder)
        except OSError:
            return -1
        return info.f_bavail * info.f_frsize

    return min(folders, key=room)


class SpaceWait:
    """The waits for space of one job: pauses with backoff, one log line per wait."""

    def __init__(self, job_id: str, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.job_id = job_id
        self._sleep = sleep
        self._pause = FIRST_PAUSE
        self._since: float | None = None
        self._what = ""

    def pause(self, what: str, folder: str, *, then: str = "trying again") -> None:
        """Sleep before the next try of ``what``; the first pause of a wait logs why."""
        if self._since is None:
            self._since, self._what = time.monotonic(), what
            logger.error(
                "job %s: cannot write %s: the disk is full; free space on the filesystem of %s;"
                " the job waits, %s every %.0f-%.0f s",
                self.job_id,
                what,
                folder,
                then,
                FIRST_PAUSE,
                LONGEST_PAUSE,
            )
        self._sleep(self._pause)
        self._pause = min(self._pause * 2, LONGEST_PAUSE)

    def went_through(self) -> None:
        """The write after a wait succeeded: say so once, and start the next wait afresh."""
        if self._since is not None:
            waited = time.monotonic() - self._since
            logger.info("job %s: %s written after waiting %.0f s for space", self.job_id, self._what, waited)
        self._since, self._pause = None, FIRST_PAUSE


def when_space(write: Callable[[], _T], space: SpaceWait, what: str, folder: str) -> _T:
    """``write()``, tried again after a pause while it fails for lack of space.

    ``write`` must be safe to try again: it removes what a failed try left behind.
    """
    while True:
        try:
            result = write()
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            space.pause(what, folder)
            continue
        space.went_through()
        return result
