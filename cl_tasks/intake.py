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
worker runs stays ``queued`` until a worker for it starts. A row whose message
left the broker without the job ending (purged, dead-lettered) is published
again (:meth:`Intake.release_stranded`): a row is never stranded.

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
from cl_tasks.jobs_table import API_DEFAULTS, JOB_PRIORITIES, JobsTableError, JobsTableMissing
from cl_tasks.lifecycle import WorkerService
from cl_tasks.messages import params_too_large
from cl_tasks.settings import Settings, current, sqlite_path
from transports.store import DatabaseFull, PublishBatch, Store, publish_batch
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
#: Seconds a published row may be without its message before it is published again, and
#: between two looks for such rows.
STRANDED_AFTER = 30.0
#: Stranded rows looked at per look.
STRANDED_BATCH = 1000


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
        self._last_problem = ""
        path = settings.sqlite_path
        self._watch = CommitWatch(path) if path is not None else None
        broker = sqlite_path(settings.broker_url)
        prefix = app.conf.broker_transport_options.get("table_prefix", "kombu_")
        self._broker = Store(broker, prefix=prefix) if broker is not None else None
        self._next_stranded_look = time.monotonic() + STRANDED_AFTER

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
                    self.release_stranded()
                    last_id = self.scan(after_id=0)
                else:
                    last_id = max(last_id, self.scan(after_id=last_id))
            except DatabaseFull as exc:
                logger.error("intake of queued jobs waits: %s", exc)
            except JobsTableMissing as exc:
                self._log_once(
                    f"intake waits: {exc}; the API service creates it (or the first Celery-side job)"
                )
            except JobsTableError as exc:
                self._log_once(f"intake waits: {exc}")
            except Exception:
                logger.exception("intake of queued jobs failed; retrying")
            self._wait(next_full_scan - time.monotonic())

    def _log_once(self, message: str) -> None:
        if message != self._last_problem:
            logger.error("%s", message)
            self._last_problem = message

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
        if after_id and top == after_id:
            return top  # no new row: do not take the write lock for nothing
        if top < after_id:
            after_id = 0  # the highest id went down: rows deleted, or a new database file
        while types:
            reserved = self._store.reserve_queued(types, after_id=after_id, limit=BATCH)
            published: list[Job] = []
            batch: PublishBatch | None = None
            try:
                # On our SQLite broker the messages of the batch are one write (the API waits
                # less often for the lock); on another broker each is sent at once.
                with publish_batch() as batch:
                    for job in reserved:
                        if self.publish(job):
                            published.append(job)
            finally:
                # One write for the marks, once the messages are; a crash before it only means
                # a late republish (after STALE_RESERVATION), which the job's claim makes a
                # no-op. Messages that could not be written (disk full) leave their rows
                # unmarked: they are published again later.
                if batch is not None and batch.written:
                    self._store.mark_published([job.job_id for job in published])
                    for job in published:
                        logger.info("queued job %s (%s) published", job.job_id, job.task_type)
            if len(reserved) < BATCH:
                break
            after_id = reserved[-1].id
        return top

    def release_stranded(self, *, now: float | None = None) -> list[str]:
        """Let intake publish again the ``queued`` rows whose message is gone; their job ids.

        A row is stranded when its message left the broker without the job
        ending: ``celery purge``, a message dead-lettered by a worker that could
        not run it, a message expired or lost. On our SQLite broker (the
        embedded default) the broker's messages are read directly: a row
        published more than :data:`STRANDED_AFTER` seconds ago with no message
        (ready or taken) in its queue loses its publish mark, and the scan that
        follows publishes it again. Looked at every :data:`STRANDED_AFTER`
        seconds. RabbitMQ and Redis cannot list a queue's messages, so there a
        purged job's row stays ``queued`` (see README, "Purge").
        """
        now = time.monotonic() if now is None else now
        if self._broker is None or now < self._next_stranded_look:
            return []
        self._next_stranded_look = now + STRANDED_AFTER
        types = list(self._task_types())
        candidates = self._store.published_queued(
            types, before=time.time() - STRANDED_AFTER, limit=STRANDED_BATCH
        )
        if not candidates:
            return []
        live = self._broker.task_ids(types)  # read after the rows: a message acked since ended its row
        stranded = [job_id for job_id in candidates if job_id not in live]
        if stranded and self._store.forget_published(stranded):
            logger.warning(
                "%d queued job(s) had no message in the broker (purged, dead-lettered or lost)"
                " and are published again: %s",
                len(stranded),
                ", ".join(stranded[:10]) + (" ..." if len(stranded) > 10 else ""),
            )
        return stranded

    def publish(self, job: Job) -> bool:
        """Publish ``job``'s message; False when its row was ended ``error`` instead.

        Whatever the row holds (bytes, a number, invalid UTF-8, 5,000-deep JSON), a row
        that cannot be published ends ``error`` with the reason, alone: it never stops
        the scan or holds back another row.
        """
        try:
            params = self._params(job)
        except _RowRefused as exc:
            self._store.fail(job.job_id, str(exc))
            logger.error("queued job %s ended error: %s", job.job_id, exc)
            return False
        self._app.publish_job(job.job_id, job.task_type, params, self._priority(job))
        return True

    def _params(self, job: Job) -> dict[str, Any]:
        """The row's params as a dict, or :class:`_RowRefused` saying what is wrong with them."""
        raw: Any = job.params
        if not isinstance(raw, (str, bytes)):
            raise _RowRefused(f"params is {type(raw).__name__}, not JSON text; fix the row's params")
        try:
            # A str read from SQLite holds invalid UTF-8 as surrogates (see cl_tasks.jobs).
            stored = raw.encode("utf-8") if isinstance(raw, str) else raw
            stored.decode("utf-8")
        except UnicodeError:
            raise _RowRefused("params is not valid UTF-8 text; fix the row's params") from None
        problem = params_too_large(len(stored), self._settings.job_params_max_bytes)
        if problem:
            raise _RowRefused(problem)
        try:
            params = json.loads(stored)
        except RecursionError:
            raise _RowRefused("params is JSON nested too deeply to read; fix the row's params") from None
        except ValueError as exc:
            raise _RowRefused(f"params is not valid JSON ({exc}); fix the row's params") from None
        if not isinstance(params, dict):
            raise _RowRefused("params must be a JSON object of the job's parameters")
        return params

    @staticmethod
    def _priority(job: Job) -> int:
        """The row's priority (0-10, default 5); anything else is logged and runs at the default."""
        if job.priority is None:
            return API_DEFAULTS["priority"]
        try:
            return max(0, min(JOB_PRIORITIES[-1], int(job.priority)))
        except (TypeError, ValueError, OverflowError):
            logger.warning(
                "job %s has priority %r, not a number from 0 to 10; it runs at the default priority",
                job.job_id,
                job.priority,
            )
            return API_DEFAULTS["priority"]


class _RowRefused(ValueError):
    """Raised when a queued row cannot become a message; the message is the row's error."""


@signals.celeryd_after_setup.connect
def check_jobs_table(**_: Any) -> None:
    """A ``jobs`` table the worker cannot use stops it at start, with one line naming the column.

    A table not made yet is waited for (the API's migration makes it; see
    :mod:`cl_tasks.jobs_table`, start order).
    """
    try:
        layout = job_store().layout
    except JobsTableMissing as exc:
        logger.warning(
            "%s; intake waits for the API service to create it (or the first Celery-side job)", exc
        )
        return
    except JobsTableError as exc:
        logger.critical("%s", exc)
        raise SystemExit(1) from exc
    logger.info("jobs table: era %s (columns %s)", layout.era, ", ".join(sorted(layout.present)))


def _start_intake(consumer: Any) -> Intake:
    intake = Intake(consumer.app, job_store(), current(), lambda: consumed_task_types(consumer))
    intake.start()
    logger.info("intake started for %s", list(consumed_task_types(consumer)))
    return intake


service = WorkerService(_start_intake, Intake.stop).connect(signals.worker_shutting_down)
