"""The Celery face of compute jobs: task definitions, routing and ``submit_job``.

A compute task's name is its task type and it is routed to the queue of the
same name (``celery worker -Q image_resize`` consumes only those). It takes
the job's ``params`` as keyword arguments and returns its ``task_output``::

    image_resize.delay(input_paths=["a.jpg"], output_paths=["out/a.jpg"], width=64, height=64)
    app.send_task("image_resize", kwargs={...})
    submit_job("image_resize", {...}, priority=5)

Each creates the ``jobs`` row too (job_id = task id; see :mod:`cl_tasks.app`).
Running a job is :mod:`cl_tasks.execution`'s; every task type a compute module
declares becomes a task when the worker starts (``worker_init``).
"""

from __future__ import annotations

from typing import Any

from celery import Task, signals
from celery.result import AsyncResult

from cl_tasks.app import app
from cl_tasks.catalog import compute_modules, is_compute
from cl_tasks.execution import engine
from cl_tasks.jobs_table import JOB_PRIORITIES
from cl_tasks.runner import JobError
from cl_tasks.settings import current


class ComputeTask(Task):  # type: ignore[misc]
    """Base of every compute task."""

    typing = False
    #: A job that ends ``error`` (bad input, a runner's own error) is expected: Celery logs it in
    #: one line (``raised expected: JobError(...)``), not with a traceback; a bug keeps its traceback.
    throws = (JobError,)
    acks_late = True
    reject_on_worker_lost = True
    #: Waiting for a live holder of the job is unbounded (Celery's default would end it after 3);
    #: a crashed runner's attempts are bounded by the row's ``max_retries`` (cl_tasks.execution).
    max_retries = None

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
    return engine().execute(self, params)


def register(task_type: str) -> ComputeTask:
    """The compute task of ``task_type`` (registered on first call; finalizes the app)."""
    existing = app.tasks.get(task_type)
    if isinstance(existing, ComputeTask):
        return existing
    return _define(task_type)


def _define(task_type: str) -> ComputeTask:
    """The compute task ``task_type``: a lazy proxy until the app is finalized (no I/O, no settings)."""
    task: ComputeTask = app.task(name=task_type, base=ComputeTask, bind=True)(_compute)
    return task


def route(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
) -> dict[str, Any] | None:
    """Celery router: a compute task goes to the queue named after its task type."""
    return {"queue": name} if isinstance(task, ComputeTask) or is_compute(name) else None


image_resize = _define("image_resize")
image_conversion = _define("image_conversion")


def submit_job(task_type: str, params: dict[str, Any], priority: int | None = None) -> AsyncResult:
    """Submit a job like the API service does, through Celery; returns its AsyncResult.

    ``priority`` is 0 (lowest) to 10 (highest), as the API's routes take it (default 5).
    Params past ``JOB_PARAMS_MAX_BYTES`` raise :class:`cl_tasks.messages.JobParamsTooLarge`,
    a row the database refuses :class:`cl_tasks.jobs.JobRowError` (from ``app.send_task``).
    """
    if not isinstance(params, dict):
        raise TypeError("params must be a dict of the job's parameters")
    if priority is not None and priority not in JOB_PRIORITIES:
        raise ValueError(f"priority must be from 0 to {JOB_PRIORITIES[-1]}, got {priority}")
    return app.send_task(task_type, kwargs=params, queue=task_type, priority=priority)


@signals.worker_init.connect
def register_discovered_tasks(**_: Any) -> None:
    """Every discovered task type becomes a task before the worker consumes.

    Each gets Celery's hard time limit ``JOB_TIME_LIMIT`` + a grace (unless
    ``task_time_limit`` is configured): the backstop that replaces a pool process
    stuck in the worker's own file work (:mod:`cl_tasks.limits`). Set here, in the
    worker only, so clients never put it into their messages.
    """
    hard_limit = current().limits.hard_time_limit
    for task_type in compute_modules():
        task = register(task_type)
        task.time_limit = task.time_limit or hard_limit
