"""Intake: queued ``jobs`` rows written by anyone become Celery messages.

A thread in the worker's main process. It reserves queued rows of the task
types this worker consumes that have no message yet (``cl_tasks_intake``) and
publishes them with task id = ``job_id`` to the queue named after the task
type. On SQLite it wakes on every commit to the database (the transport's
inotify watch), so a new row is published within milliseconds; on other
databases, and for rows set back to ``queued`` by an update, it relies on the
full scan every ``WORKER_POLL_INTERVAL`` seconds. Reservations whose publisher
died before publishing are dropped after a minute and published again.

A row whose ``params`` is not a JSON object, or is past ``JOB_PARAMS_MAX_BYTES``
as stored, ends ``error`` at once.
A ``priority`` that is not a number is logged and the job runs at the default
priority (it orders jobs; it is not the job's input). A row of a task type no
worker runs stays ``queued`` until a worker for it starts.

Intake runs once per worker: it starts when the worker is ready
(``worker_ready``, which repeats on reconnect) and stops at shutdown.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from celery import signals

from cl_tasks.app import App
from cl_tasks.catalog import consumed_task_types
from cl_tasks.jobs import Job, JobStore, job_store
from cl_tasks.messages import params_too_large
from cl_tasks.settings import Settings, current
from transports.store import DatabaseFull
from transports.wakeup import CommitWatch

logger = logging.getLogger(__name__)

#: Rows reserved per transaction.
BATCH = 100
#: Seconds after which an unpublished reservation is given up and retried.
STALE_RESERVATION = 60.0
#: Shortest pause between two scans while commits keep coming (seconds).
MIN_SCAN_GAP = 0.002
#: Pause after a wake-up before looking (seconds): the commit must become visible.
COMMIT_SETTLE = 0.0005


class Intake(threading.Thread):
    """Publishes queued rows of ``task_types()`` until :meth:`stop` is called."""

    def __init__(
        self, app: App, store: JobStore, settings: Settings, task_types: Callable[[], Iterable[str]]
    ) -> None:
        super().__init__(name="cl_tasks-intake", daemon=True)
        self._app = app
        self._store = store
        self._settings = settings
        self._task_types = task_types
        self._stopped = threading.Event()
        self._last_scan = 0.0
        path = settings.sqlite_path
        self._watch = CommitWatch(path) if path is not None else None

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        last_id = 0
        next_full_scan = 0.0
        while not self._stopped.is_set():
            if self._watch is not None:
                self._watch.drain()
            try:
                if time.monotonic() >= next_full_scan:
                    next_full_scan = time.monotonic() + self._settings.poll_interval
                    self._store.forget_stale_reservations(STALE_RESERVATION)
                    last_id = self.scan(after_id=0)
                else:
                    last_id = max(last_id, self.scan(after_id=last_id))
            except DatabaseFull as exc:
                logger.error("intake of queued jobs waits: %s", exc)
            except Exception:
                logger.exception("intake of queued jobs failed; retrying")
            self._wait(next_full_scan - time.monotonic())

    def _wait(self, timeout: float) -> None:
        timeout = max(timeout, MIN_SCAN_GAP)
        if self._watch is None:
            self._stopped.wait(timeout)
            return
        if self._watch.wait(timeout) == "interrupt":
            self._stopped.wait(timeout)
        # The commit that woke us is visible a moment after its WAL write; and while
        # commits keep coming, scans are spaced MIN_SCAN_GAP apart.
        time.sleep(max(COMMIT_SETTLE, self._last_scan + MIN_SCAN_GAP - time.monotonic()))

    def scan(self, *, after_id: int) -> int:
        """Publish every reservable row above ``after_id``; returns the highest id looked at."""
        self._last_scan = time.monotonic()
        types = list(self._task_types())
        top = self._store.max_id()
        if after_id and top <= after_id:
            return top  # no new row: do not take the write lock for nothing
        while types:
            reserved = self._store.reserve_queued(types, after_id=after_id, limit=BATCH)
            published: list[str] = []
            try:
                for job in reserved:
                    if self.publish(job):
                        published.append(job.job_id)
            finally:
                # One write for the batch; a crash before it only means a late republish
                # (after STALE_RESERVATION), and the job's claim makes that a no-op.
                self._store.mark_published(published)
            if len(reserved) < BATCH:
                break
            after_id = reserved[-1].id
        return top

    def publish(self, job: Job) -> bool:
        """Publish ``job``'s message; False when its row was ended ``error`` instead."""
        limit = self._settings.job_params_max_bytes
        stored = job.params.encode("utf-8") if isinstance(job.params, str) else bytes(job.params)
        problem = params_too_large(len(stored), limit)
        if problem:
            self._store.fail(job.job_id, problem)
            return False
        try:
            params = json.loads(stored)
        except ValueError as exc:
            self._store.fail(job.job_id, f"params is not valid JSON ({exc}); fix the row's params")
            return False
        if not isinstance(params, dict):
            self._store.fail(job.job_id, "params must be a JSON object of the job's parameters")
            return False
        self._app.publish_job(job.job_id, job.task_type, params, self._priority(job))
        logger.info("queued job %s (%s) published", job.job_id, job.task_type)
        return True

    @staticmethod
    def _priority(job: Job) -> int | None:
        if job.priority is None:
            return None
        try:
            return max(0, min(9, int(job.priority)))
        except (TypeError, ValueError, OverflowError):
            logger.warning(
                "job %s has priority %r, not a number from 0 to 9; it runs at the default priority",
                job.job_id,
                job.priority,
            )
            return None


class IntakeStarter:
    """Starts this worker's :class:`Intake` when it is ready (once) and stops it at shutdown."""

    def __init__(self) -> None:
        self.intake: Intake | None = None

    def on_ready(self, sender: Any = None, **_: Any) -> None:
        if self.intake is not None or sender is None:
            return
        self.intake = Intake(sender.app, job_store(), current(), lambda: consumed_task_types(sender))
        self.intake.start()
        logger.info("intake started for %s", list(consumed_task_types(sender)))

    def on_shutting_down(self, **_: Any) -> None:
        if self.intake is not None:
            self.intake.stop()


_starter = IntakeStarter()
signals.worker_ready.connect(_starter.on_ready, weak=False)
signals.worker_shutting_down.connect(_starter.on_shutting_down, weak=False)
