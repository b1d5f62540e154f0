"""The compute tasks: claim the ``jobs`` row, run the module's runner, record the end.

A compute task's name is its task type and it is routed to the queue of the
same name (``celery worker -Q image_resize`` consumes only those). It takes
the job's ``params`` as keyword arguments and returns its ``task_output``::

    image_resize.delay(input_paths=["a.jpg"], output_paths=["out/a.jpg"], width=64, height=64)
    app.send_task("image_resize", kwargs={...})
    submit_job("image_resize", {...}, priority=5)

Each creates the ``jobs`` row too (job_id = task id; see ``cl_tasks.signals``).
A delivery of a job that already ended is dropped; one whose job another live
worker holds is retried when that worker's lease would run out.

Params past ``JOB_PARAMS_MAX_BYTES`` are refused by the client before anything
is written (:mod:`cl_tasks.messages`), and again here, for messages from clients
with a larger limit: the job ends ``error`` naming the limit. Runners are
confined as :mod:`cl_tasks.confinement` says and see only their job's files, which
:mod:`cl_tasks.staging` stages in and out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.result import AsyncResult
from sqlalchemy.exc import SQLAlchemyError

from cl_tasks import hooks
from cl_tasks.app import app
from cl_tasks.confinement import Confinement, detect
from cl_tasks.jobs import DiskFull, JobStore, job_store
from cl_tasks.messages import params_size, params_too_large
from cl_tasks.modules import Module, ModuleError, discover, venv_python
from cl_tasks.results import ResultBackend
from cl_tasks.runner import JobError, RunnerPool
from cl_tasks.settings import current
from cl_tasks.staging import Protected, run_job

logger = logging.getLogger(__name__)

#: Seconds between progress writes to the database and the result backend.
PROGRESS_EVERY = 0.5
#: Seconds between tries of a job's claim or end while the database's disk is full.
DISK_FULL_RETRY = 2.0
#: Highest Celery priority (the SQLite broker and RabbitMQ queues use 0-9).
MAX_PRIORITY = 9

_runners = RunnerPool()


@cache
def compute_modules() -> dict[str, Module]:
    """Task type -> module, discovered once per process."""
    settings = current()
    return discover(settings.modules_dir, settings.supported_tasks)


class ComputeTask(Task):  # type: ignore[misc]
    """Base of every compute task."""

    typing = False
    acks_late = True
    reject_on_worker_lost = True

    def __call__(self, /, *args: Any, **params: Any) -> Any:
        # Celery's own __call__ takes ``self`` as a keyword too, so a job parameter named
        # "self" failed inside Celery with a TypeError. In a worker the tracer has pushed
        # the request already: run directly, as Celery's __call__ would.
        request = self.request_stack.top
        if request is not None and not request.called_directly:
            return self.run(*args, **params)
        return super().__call__(*args, **params)


def _compute(self: ComputeTask, /, *args: Any, **params: Any) -> Any:
    # ``self`` is positional-only, so a job may have a parameter called "self".
    if args:
        raise JobError(f"{self.name} takes keyword arguments (the job's params), not positional ones")
    return execute(self, params)


def register(task_type: str) -> ComputeTask:
    """The compute task of ``task_type`` (registered on first call)."""
    existing = app.tasks.get(task_type)
    if isinstance(existing, ComputeTask):
        return existing
    task: ComputeTask = app.task(name=task_type, base=ComputeTask, bind=True)(_compute)
    return task


def route(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
) -> dict[str, Any] | None:
    """Celery router: a compute task goes to the queue named after its task type."""
    return {"queue": name} if isinstance(task, ComputeTask) or is_compute(name) else None


def is_compute(name: str) -> bool:
    return isinstance(app.tasks.get(name), ComputeTask) or name in compute_modules()


image_resize = register("image_resize")
image_conversion = register("image_conversion")


def submit_job(task_type: str, params: dict[str, Any], priority: int | None = None) -> AsyncResult:
    """Submit a job like the API service does, through Celery; returns its AsyncResult.

    ``priority`` is 0 (lowest) to 9 (highest). Params past ``JOB_PARAMS_MAX_BYTES``
    raise :class:`cl_tasks.messages.JobParamsTooLarge` (from ``app.send_task``).
    """
    if not isinstance(params, dict):
        raise TypeError("params must be a dict of the job's parameters")
    if priority is not None and not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be from 0 to {MAX_PRIORITY}, got {priority}")
    return app.send_task(task_type, kwargs=params, queue=task_type, priority=priority)


class _Leases:
    """Renews the leases of this process's running jobs from one thread (made after fork)."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pid = 0

    @contextmanager
    def holding(self, store: JobStore, job_id: str, owner: str, lease: float) -> Iterator[None]:
        with self._lock:
            if self._pid != os.getpid():
                self._held = {}
                self._pid = os.getpid()
                thread = threading.Thread(target=self._renew, args=(store, lease), daemon=True)
                thread.start()
            self._held[job_id] = owner
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(job_id, None)

    def _renew(self, store: JobStore, lease: float) -> None:
        while True:
            time.sleep(lease / 3)
            with self._lock:
                held = list(self._held.items())
            for job_id, owner in held:
                try:
                    store.renew(job_id, owner, lease)
                except Exception:  # retried next round; the lease is three rounds long
                    continue


_leases = _Leases()


class _Progress:
    """Throttled progress: jobs.progress, Celery state PROGRESS and a task-progress event."""

    def __init__(self, task: ComputeTask, store: JobStore, owner: str) -> None:
        self._task, self._store, self._owner = task, store, owner
        self._last_sent = 0.0
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
            self._task.update_state(state="PROGRESS", meta={"job_id": job_id, "progress": progress})
        except (DiskFull, SQLAlchemyError) as exc:
            # Progress is a hint: the job goes on; its end is what must be written.
            logger.warning("progress %.0f%% of job %s not recorded: %s", progress, job_id, exc)
            return
        self._task.send_event("task-progress", progress=progress)
        hooks.job_progress.send(sender=self._task.name, job_id=job_id, progress=progress)


def execute(task: ComputeTask, params: dict[str, Any]) -> Any:
    """Run one job to ``completed`` or ``error`` (raising :class:`JobError` for the latter)."""
    settings = current()
    store = job_store()
    job_id = task.request.id
    owner = f"{task.request.hostname}:{os.getpid()}:{job_id}"
    claim = _written(lambda: store.claim(job_id, owner, settings.job_lease))
    if claim.outcome == "missing":
        _written(lambda: store.create(job_id, task.name, params))
        claim = _written(lambda: store.claim(job_id, owner, settings.job_lease))
    if claim.outcome == "done":
        raise Ignore()
    if claim.outcome == "busy":
        raise task.retry(countdown=claim.retry_in + 0.5, max_retries=None)
    hooks.job_progress.send(sender=task.name, job_id=job_id, progress=0.0)
    with _leases.holding(store, job_id, owner, settings.job_lease):
        try:
            output = _run(task, params, owner)
        except SoftTimeLimitExceeded:
            message = f"stopped: the soft time limit of {task.request.timelimit[1]} s was exceeded"
            _fail(store, task, owner, message)
            raise JobError(message) from None
        except JobError as exc:
            _fail(store, task, owner, str(exc))
            raise
        except Exception as exc:
            _fail(store, task, owner, f"internal error in the worker: {exc!r}")
            raise
    backend = task.backend
    result = None
    request = task.request
    ignored = task.ignore_result or getattr(request, "ignore_result", False)
    # With callbacks or a chain the tracer fills the result's ``children`` first: it stores.
    plain = not (request.callbacks or request.chain or request.is_eager)
    if isinstance(backend, ResultBackend) and plain and not ignored:
        result = backend.success_writer(job_id, output, task.request)
    if _written(lambda: store.complete(job_id, owner, output, also=result)):
        if result is not None:
            backend.written_with_job(job_id)
        hooks.job_completed.send(sender=task.name, job_id=job_id, output=output)
    return output


_T = TypeVar("_T")


def _written(write: Callable[[], _T]) -> _T:
    """``write()``, tried again while the database's disk is full.

    The job waits with its message unacked (a full disk is the operator's to
    fix, not the job's fault), so it neither ends ``error`` nor gets lost.
    """
    while True:
        try:
            return write()
        except DiskFull as exc:
            logger.error("%s; the job waits, trying again in %.0f s", exc, DISK_FULL_RETRY)
            time.sleep(DISK_FULL_RETRY)


def _fail(store: JobStore, task: ComputeTask, owner: str, message: str) -> None:
    if _written(lambda: store.fail(task.request.id, message, owner)):
        hooks.job_failed.send(sender=task.name, job_id=task.request.id, message=message)


def _confinement() -> Confinement:
    """How runners of this worker are confined (see cl_tasks.confinement)."""
    return detect()


def start_runners(task_types: Iterable[str]) -> None:
    """Start the runners of ``task_types``' modules now, so no job waits for one to start.

    Called in each pool process as it starts (a runner takes about 0.2 s to import
    its libraries). Only modules whose venv the worker built are started; a runner
    that fails to start is logged and left to the first job, which reports why.
    """
    settings = current()
    wanted = set(task_types)
    modules = {module.name: module for name, module in compute_modules().items() if name in wanted}
    for module in modules.values():
        try:
            python = venv_python(settings.venv_dir, module)
            _runners.get(module, python, settings.server_dir, _confinement())
        except (ModuleError, OSError) as exc:
            name = module.name
            logger.warning("runner of module %s not started ahead (the first job tries): %s", name, exc)


def _run(task: ComputeTask, params: dict[str, Any], owner: str) -> Any:
    settings = current()
    module = compute_modules().get(task.name)
    if module is None:
        raise JobError(f"no compute module for task type {task.name} on this worker")
    problem = params_too_large(params_size(params), settings.job_params_max_bytes)
    if problem:
        raise JobError(problem)
    try:
        python = venv_python(settings.venv_dir, module)
    except ModuleError as exc:
        raise JobError(str(exc)) from exc
    runner = _runners.get(module, python, settings.server_dir, _confinement())
    try:
        progress = _Progress(task, job_store(), owner)
        return run_job(runner, task.request.id, task.name, params, progress, Protected.of(settings))
    except JobError:
        if not runner.alive():
            _runners.discard(module)
        raise
    except BaseException:
        # Interrupted mid-job (time limit, shutdown): stop the runner's whole process group.
        _runners.discard(module)
        raise
