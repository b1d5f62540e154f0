"""How much of SQLite's write lock the job processes take: the API's writers come first.

A SQLite file has one write lock. The API service inserts its rows through it with
SQLite's own busy handler, which sleeps 1, 2, 5, 10 ms ... between tries: each time
an insert finds the lock held it waits a millisecond or more, and the chance of
finding it held again at the next try is the same. A worker running many tiny jobs
a second (64 px thumbnails, ~150 a second on two cores) holds the lock about 30 % of
the time, and the API's p99 insert went from about 1 ms to 20 ms
(``bench/api_latency.py``; docs/performance.md has the figures).

``DB_WRITE_SHARE`` lets an operator put the API first: the job processes of every
worker on one database file then share a budget of that part of wall time. Each
process measures how long its own write transactions held the lock (``BEGIN
IMMEDIATE`` to the end of ``COMMIT``) and, before it claims its next job, waits until
its part of the budget (the share divided by the processes holding a job now, itself
included) has paid for them, allowing a burst of :data:`BURST` seconds of lock time.
The worker's main process (intake, message claims) is never made to wait: its writes
follow the jobs' pace. Photo-sized jobs hardly reach a budget of a few per cent (a
12 MP photo's job holds the lock about a millisecond per 40 ms or more of decoding);
a flood of tiny jobs is slowed to about ``share / (lock time per job)`` a second.

The default is no budget (``1``), decided with the bench's figures (docs/performance.md,
2026-12-04): beside a flood of tiny jobs, 0.05 cut the API's insert p99 from 35 to
9 ms and the jobs' rate from 141 to 61 a second; 0.01 gave 2.1 ms at 11 a second, and
with 12 MP photos 5.4 ms (from 16) at 10 jobs a second instead of 23. On PostgreSQL
there is no file-wide lock and no budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: The part of wall time the job processes on one database file may hold its write lock (1: all).
DEFAULT_SHARE = 1.0
#: Seconds of lock time a process may spend at once before the budget paces it.
BURST = 0.01
#: The longest wait, and the largest debt: a commit that stalled on the disk for
#: seconds costs one such pause, not a pause at each of the next thousand claims.
MAX_PAUSE = 1.0
#: Seconds between two looks at how many processes share the budget.
SPLIT_RECHECK = 1.0


class WriteShare:
    """One process's part of the write-lock budget: a bucket of lock time (thread-safe).

    ``processes()`` says how many processes share ``share`` now (this one
    included); :meth:`wait` asks it, at most every :data:`SPLIT_RECHECK` seconds,
    outside the lock (it may read the database) and before this process's claim,
    when it holds no job of its own.
    """

    def __init__(
        self,
        share: float,
        processes: Callable[[], int],
        *,
        burst: float = BURST,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.share = share
        self._processes = processes
        self._burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = burst
        self._at = clock()
        self._split_at = -float("inf")
        self._split = 1

    def spent(self, seconds: float) -> None:
        """This process held the write lock for ``seconds``."""
        with self._lock:
            self._refill()
            self._tokens = max(self._tokens - seconds, -MAX_PAUSE * self._rate())

    def wait(self) -> float:
        """Sleep until the budget has paid for this process's writes so far; the seconds slept."""
        now = self._clock()
        split = max(1, self._processes()) if now - self._split_at >= SPLIT_RECHECK else None
        with self._lock:
            self._refill()  # earned at the old split until now
            if split is not None:
                self._split, self._split_at = split, now
            pause = min(MAX_PAUSE, -self._tokens / self._rate()) if self._tokens < 0 else 0.0
        if pause:
            self._sleep(pause)
        return pause

    def _rate(self) -> float:
        """Seconds of lock time this process earns per second."""
        return self.share / self._split

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate())
        self._at = now
