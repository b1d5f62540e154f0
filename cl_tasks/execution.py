"""Running one job: claim its row, drive the module's runner, record progress and the end.

:class:`Engine` is the execution engine of one process (one per pool process,
made after fork by :func:`engine`); it is given its jobs table, settings and
modules, so it also runs in-process in tests. For each delivery of a job:

* the row is claimed (idempotent): a job that already ended is dropped; one
  whose job another live worker holds is retried when that worker's lease
  would run out; a job whose worker died is taken over;
* while the runner works, the job's lease is renewed (:class:`Leases`) and
  progress is written, throttled (:class:`Progress`);
* the end is ``completed`` with the output, or ``error`` with the message,
  written while the disk is full by trying again (the job waits, unacked).

Params past ``JOB_PARAMS_MAX_BYTES`` end ``error`` naming the limit (a message
from a client with a larger limit), and so do jobs past ``JOB_MAX_PAIRS`` or
``JOB_MAX_OUTPUT_PIXELS``, before any work. A job runs under ``JOB_TIME_LIMIT``
(:mod:`cl_tasks.limits`): past it its runner is killed and replaced, the row ends
``error`` naming the limit, and the job is not retried (a limit, not a crash). Runners are confined as
:mod:`cl_tasks.confinement` says and see only their job's files, which
:mod:`cl_tasks.staging` stages in and out.

Signals of this concern: pool processes start their runners as they start
(``worker_process_init``); a revoked job and a failure the task could not
record itself (a hard time limit, a lost pool process) end the row ``error``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from celery import Task, signals, states
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import SQLAlchemyError

from cl_tasks import hooks
from cl_tasks.app import app
from cl_tasks.catalog import compute_modules, is_compute
from cl_tasks.confinement import detect
from cl_tasks.jobs import Job, JobStore, job_store
from cl_tasks.jobs_table import API_DEFAULTS
from cl_tasks.limits import HARD_LIMIT_GRACE
from cl_tasks.messages import params_too_large
from cl_tasks.modules import Module, ModuleError, venv_python
from cl_tasks.results import ResultBackend
from cl_tasks.runner import JobError, RunnerCrashed, RunnerPool
from cl_tasks.settings import Settings, current
from cl_tasks.staging import Protected, run_job
from transports.process import PerProcess
from transports.store import DatabaseFull

logger = logging.getLogger(__name__)

#: Seconds between progress writes to the database and the result backend.
PROGRESS_EVERY = 0.5
#: Seconds between tries of a job's claim or end while the database's disk is full.
DISK_FULL_RETRY = 2.0
#: Seconds before a job whose runner crashed runs again.
RETRY_DELAY = 1.0

_T = TypeVar("_T")


def written(write: Callable[[], _T]) -> _T:
    """``write()``, tried again while the database's disk is full.

    The job waits with its message unacked (a full disk is the operator's to
    fix, not the job's fault), so it neither ends ``error`` nor gets lost.
    """
    while True:
        try:
            return write()
        except DatabaseFull as exc:
            logger.error("%s; the job waits, trying again in %.0f s", exc, DISK_FULL_RETRY)
            time.sleep(DISK_FULL_RETRY)


class Leases:
    """Renews the leases of this process's running jobs from one thread, started on first use."""

    def __init__(self, store: JobStore, lease: float) -> None:
        self._store, self._lease = store, lease
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, job_id: str, owner: str) -> Iterator[None]:
        """Keep ``owner``'s lease of ``job_id`` alive while the block runs."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew, name="cl_tasks-leases", daemon=True)
                self._thread.start()
            self._held[job_id] = owner
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(job_id, None)

    def _renew(self) -> None:
        while True:
            time.sleep(self._lease / 3)
            with self._lock:
                held = list(self._held.items())
            for job_id, owner in held:
                self.renew(job_id, owner)

    def renew(self, job_id: str, owner: str) -> None:
        """Extend one lease now; a failure is logged and retried next round (a lease is 3 rounds)."""
        try:
            if not self._store.renew(job_id, owner, self._lease):
                logger.warning(
                    "job %s: its lease was lost (another worker took the job over, or the row is gone);"
                    " this worker's result will not be recorded",
                    job_id,
                )
                with self._lock:
                    self._held.pop(job_id, None)
        except (DatabaseFull, SQLAlchemyError) as exc:
            logger.warning(
                "job %s: renewing its lease failed, retried in %.1f s: %s", job_id, self._lease / 3, exc
            )


class Progress:
    """Throttled progress: jobs.progress, Celery state STARTED with it, and a task-progress event.

    A running job's result state is Celery's own ``STARTED`` (so Flower, ``celery
    inspect`` and clients treat it as running: Flower's Started filter, its
    Terminate button); its meta is Celery's STARTED meta (``pid``, ``hostname``)
    plus ``job_id`` and ``progress``, which ``AsyncResult.info`` returns.
    """

    def __init__(self, task: Task, store: JobStore, owner: str) -> None:
        self._task, self._store, self._owner = task, store, owner
        self._last_sent = -math.inf  # not 0.0: the monotonic clock starts near zero at boot
        self._last_value = -1.0

    def __call__(self, progress: float) -> None:
        progress = max(0.0, min(100.0, progress))
        now = time.monotonic()
        # 100 % is recorded by the completion itself, with the output.
        if progress >= 100.0 or progress <= self._last_value or now - self._last_sent < PROGRESS_EVERY:
            return
        self._last_sent, self._last_value = now, progress
        job_id = self._task.request.id
        try:
            self._store.set_progress(job_id, self._owner, int(progress))
            meta = {"pid": os.getpid(), "hostname": self._task.request.hostname, "job_id": job_id}
            self._task.update_state(state=states.STARTED, meta={**meta, "progress": progress})
        except (DatabaseFull, SQLAlchemyError) as exc:
            # Progress is a hint: the job goes on; its end is what must be written.
            logger.warning("progress %.0f%% of job %s not recorded: %s", progress, job_id, exc)
            return
        self._task.send_event("task-progress", progress=progress)
        hooks.job_progress.send(sender=self._task.name, job_id=job_id, progress=progress)


class Engine:
    """Runs the jobs of one process with ``store``, ``settings`` and ``modules``."""

    def __init__(self, *, store: JobStore, settings: Settings, modules: Mapping[str, Module]) -> None:
        self.store = store
        self.settings = settings
        self.modules = modules
        self.runners = RunnerPool()
        self.leases = Leases(store, settings.job_lease)
        self.confinement = detect()
        self.protected = Protected.of(settings)

    def execute(self, task: Task, params: dict[str, Any]) -> Any:
        """Run one job to ``completed`` or ``error`` (raising :class:`JobError` for the latter)."""
        store, job_id = self.store, task.request.id
        owner = f"{task.request.hostname}:{os.getpid()}:{job_id}"
        store.pace()  # the API's writers first: within DB_WRITE_SHARE of the write lock
        claim = written(lambda: store.claim(job_id, owner, self.settings.job_lease))
        if claim.outcome == "missing":
            # Every submit path writes the row before the message: a row that is gone was
            # deleted by the API service, which is how it cancels a job.
            logger.warning(
                "job %s (%s): its jobs row is gone (cancelled); the message is dropped", job_id, task.name
            )
            raise Ignore()
        if claim.outcome == "done":
            raise Ignore()
        if claim.outcome == "busy":
            # Another live worker holds it: wait for as long as it lives (ComputeTask.max_retries is None).
            logger.info(
                "job %s: another live worker holds it; retried when its lease would end (in %.1f s)",
                job_id,
                claim.retry_in,
            )
            raise task.retry(countdown=claim.retry_in + 0.5)
        assert claim.job is not None
        hooks.job_progress.send(sender=task.name, job_id=job_id, progress=0.0)
        with self.leases.holding(job_id, owner):
            try:
                output = self._run(task, params, owner)
            except RunnerCrashed as exc:
                raise self._retry_or_fail(task, claim.job, owner, exc) from None
            except SoftTimeLimitExceeded:
                message = f"stopped: the soft time limit of {task.request.timelimit[1]} s was exceeded"
                self.fail(task.name, job_id, message, owner)
                raise JobError(message) from None
            except JobError as exc:
                self.fail(task.name, job_id, str(exc), owner)
                raise
            except Exception as exc:
                self.fail(task.name, job_id, f"internal error in the worker: {exc!r}", owner)
                raise
        self._complete(task, output, owner)
        return output

    def _retry_or_fail(self, task: Task, job: Job, owner: str, crash: RunnerCrashed) -> BaseException:
        """A crashed or killed runner: the job runs again up to the row's ``max_retries``.

        ``retry_count`` counts the attempts made; past ``max_retries`` the job ends
        ``error`` naming them. (Bad input is a :class:`JobError`, never retried.)
        """
        attempt = (job.retry_count or 0) + 1
        allowed = API_DEFAULTS["max_retries"] if job.max_retries is None else int(job.max_retries)
        if attempt > allowed:
            message = f"{crash} (attempt {attempt}; max_retries={allowed} retries used up)"
            self.fail(task.name, job.job_id, message, owner)
            return JobError(message)
        note = f"attempt {attempt} failed, retrying: {crash}"
        logger.warning("job %s: %s", job.job_id, note)
        if not written(lambda: self.store.requeue(job.job_id, owner, note)):
            dropped: BaseException = Ignore()  # another worker took it over meanwhile
            return dropped
        retry: BaseException = task.retry(countdown=RETRY_DELAY, exc=crash)
        return retry

    def _complete(self, task: Task, output: Any, owner: str) -> None:
        request, backend, job_id = task.request, task.backend, task.request.id
        result = None
        ignored = task.ignore_result or getattr(request, "ignore_result", False)
        # With callbacks or a chain the tracer fills the result's ``children`` first: it stores.
        plain = not (request.callbacks or request.chain or request.is_eager)
        if isinstance(backend, ResultBackend) and plain and not ignored:
            result = backend.success_writer(job_id, output, request)
        if written(lambda: self.store.complete(job_id, owner, output, also=result)):
            if result is not None:
                backend.written_with_job(job_id)
            hooks.job_completed.send(sender=task.name, job_id=job_id, output=output)

    def fail(self, task_type: str, job_id: str, message: str, owner: str | None = None) -> None:
        """End the job ``error`` with ``message`` (held by ``owner``, or by anyone when None)."""
        if written(lambda: self.store.fail(job_id, message, owner)):
            hooks.job_failed.send(sender=task_type, job_id=job_id, message=message)

    def start_runners(self, task_types: Iterable[str]) -> None:
        """Start the runners of ``task_types``' modules now, so no job waits for one to start.

        Called in each pool process as it starts (a runner takes about 0.2 s to import
        its libraries). Only modules whose venv the worker built are started; a runner
        that fails to start is logged and left to the first job, which reports why.
        """
        wanted = set(task_types)
        modules = {module.name: module for name, module in self.modules.items() if name in wanted}
        for module in modules.values():
            try:
                python = venv_python(self.settings.venv_dir, module)
                self.runners.get(module, python, self.settings.server_dir, self.confinement)
            except (ModuleError, OSError) as exc:
                name = module.name
                logger.warning("runner of module %s not started ahead (the first job tries): %s", name, exc)

    def _run(self, task: Task, params: dict[str, Any], owner: str) -> Any:
        settings = self.settings
        module = self.modules.get(task.name)
        if module is None:
            raise JobError(f"no compute module for task type {task.name} on this worker")
        problem = params_too_large(len(_json(params).encode("utf-8")), settings.job_params_max_bytes)
        problem = problem or settings.limits.refusal(params)
        if problem:
            raise JobError(problem)
        # A call's own soft time limit may stop the job sooner (Celery raises SoftTimeLimitExceeded).
        deadline = settings.limits.deadline()
        try:
            python = venv_python(settings.venv_dir, module)
        except ModuleError as exc:
            raise JobError(str(exc)) from exc
        runner = self.runners.get(module, python, settings.server_dir, self.confinement)
        try:
            progress = Progress(task, self.store, owner)
            return run_job(runner, task.request.id, task.name, params, progress, self.protected, deadline)
        except JobError:
            if not runner.alive():
                self.runners.discard(module)
            raise
        except BaseException:
            # Interrupted mid-job (time limit, shutdown): stop the runner's whole process group.
            self.runners.discard(module)
            raise


def _json(params: dict[str, Any]) -> str:
    return json.dumps(params)


_engine: PerProcess[Engine] = PerProcess(
    lambda: Engine(store=job_store(), settings=current(), modules=compute_modules())
)


def engine() -> Engine:
    """This process's :class:`Engine` on ``DATABASE_URL`` and the discovered modules."""
    return _engine.get()


@signals.worker_process_init.connect
def warm_runners(**_: Any) -> None:
    """A new pool process starts the runners of the task types its worker consumes."""
    queues = app.amqp.queues
    engine().start_runners(queues.consume_from or queues)


@signals.task_revoked.connect
def fail_revoked_job(
    request: Any = None, terminated: bool = False, signum: Any = None, expired: bool = False, **_: Any
) -> None:
    """A revoked compute job ends ``error`` saying why (its runner died with its process)."""
    if request is None or not is_compute(getattr(request, "task", "") or ""):
        return
    if terminated:
        name = signal.Signals(int(signum)).name if signum else "a signal"
        reason = f"revoked: terminated with {name} while running"
    elif expired:
        reason = "revoked: its expiry time passed before it ran"
    else:
        reason = "revoked before it ran"
    engine().fail(request.task, request.id, reason)


@signals.task_failure.connect
def fail_job_on_failure(
    sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
) -> None:
    """Failures the task could not record itself (hard time limit, lost worker process)."""
    if sender is None or task_id is None or not is_compute(getattr(sender, "name", "")):
        return
    if isinstance(exception, TimeLimitExceeded) and exception.args:
        message = (
            f"TimeLimitExceeded: the hard time limit of {exception.args[0]:g} s was exceeded and the pool"
            f" process was replaced (the call's time_limit, else JOB_TIME_LIMIT + {HARD_LIMIT_GRACE:g} s)"
        )
    else:
        message = f"{type(exception).__name__}: {exception}"
    engine().fail(sender.name, task_id, message)
