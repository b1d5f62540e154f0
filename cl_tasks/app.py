"""The Celery app of cl_tasks (``celery -A cl_tasks``) and the one path by which jobs are submitted.

The app is configured from the checkout's ``celeryconfig.py`` (see
:mod:`cl_tasks.config`). :class:`App` is Celery's app with one submit path for
compute jobs: ``image_resize.delay(...)``,
``app.send_task("image_resize", ...)``, ``submit_job(...)``, a chain's next
step and a task's own retry all reach :meth:`App.send_task`, which

1. checks the serializer and encodes the params once (:mod:`cl_tasks.messages`),
2. writes the ``jobs`` row (job_id = task id) with its intake reserved,
3. publishes the message, and
4. marks the reservation published.

A row that cannot be written raises :class:`cl_tasks.jobs.JobRowError` (with
the database's reason) from the call, so a client never holds a task id of a
job that has no row. ``priority`` is the job's priority as the API's routes take
it, 0-10 (default 5, stored in the row); the broker gets the matching 0-9
(:func:`cl_tasks.jobs_table.broker_priority`: 10 runs before 9). Where no API
service made the ``jobs`` table, the first submission creates it (era A).
Intake, whose rows exist already, publishes through :meth:`App.publish_job`
(step 3 only; it marks its batches itself).
Other tasks are published as Celery does.

The worker program is :class:`cl_tasks.startup.Worker` (it prepares
``CL_SERVER_DIR`` and says in its banner where the jobs are). At shutdown the
consumer is woken at once, so it does not sit out its drain timeout.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from celery import Celery, _state, signals
from celery.result import AsyncResult
from kombu.utils.uuid import uuid

import transports  # noqa: F401 - registers the ``sqlite://`` broker alias
from cl_tasks import flower_support
from cl_tasks.catalog import is_compute
from cl_tasks.jobs import job_store
from cl_tasks.jobs_table import API_DEFAULTS, broker_priority
from cl_tasks.messages import check_serializer, encode_params
from cl_tasks.settings import current
from transports.wakeup import interrupt


class App(Celery):  # type: ignore[misc]
    """The Celery app of cl_tasks: compute jobs get their ``jobs`` row before their message."""

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        check_serializer(
            name, options.get("serializer") or self.conf.task_serializer, self.conf.accept_content
        )
        if not is_compute(name):
            return super().send_task(name, args, kwargs, **options)
        params = dict(kwargs or {})
        text = encode_params(name, params, current().job_params_max_bytes)
        task_id = options.pop("task_id", None) or uuid()
        priority = options.get("priority")
        job_priority = API_DEFAULTS["priority"] if priority is None else int(priority)
        options["priority"] = broker_priority(job_priority)
        store = job_store()
        store.ensure_jobs_table()
        store.create(task_id, name, text, priority=job_priority)
        result = super().send_task(name, args, params, task_id=task_id, **options)
        store.mark_published([task_id])
        return result

    @cached_property
    def Worker(self) -> Any:
        """Celery's worker program, with cl_tasks' start-up notes (:mod:`cl_tasks.startup`)."""
        return self.subclass_with_self("cl_tasks.startup:Worker")

    def publish_job(
        self, job_id: str, task_type: str, params: dict[str, Any], priority: int | None
    ) -> AsyncResult:
        """Publish the message of a job whose row exists and is reserved (intake's path)."""
        return super().send_task(task_type, kwargs=params, task_id=job_id, queue=task_type, priority=priority)


# Our app becomes Celery's current app, unless a process already made another app current:
# a foreign app that uses our result backend (``cl_tasks.results``, whose import loads this
# package) must keep its own, or its pool processes look its tasks up in ours.
app = App("cl_tasks", events="cl_tasks.events:Events", set_as_current=_state._tls.current_app is None)
app.config_from_object("cl_tasks.config:CELERY_CONFIG")
app.conf.task_routes = ("cl_tasks.tasks.route",)
app.conf.worker_consumer = "cl_tasks.messages:Consumer"
# Under `celery -A cl_tasks flower`, Flower is loaded before the app: teach it our broker.
flower_support.install()


@signals.worker_shutting_down.connect
def wake_consumer(**_: Any) -> None:
    """Wake the consumer now, so shutdown does not wait out a drain timeout."""
    interrupt()
