"""Celery signal handlers: jobs rows for submitted tasks, intake, ends of stopped jobs.

Celery logs and swallows a handler's exception, so none of these can fail a
publish or a task. Nothing is lost by it: when the row of a submitted job
could not be written at publish time, the worker creates it when the job runs.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from celery import signals
from celery.worker import state as worker_state

from cl_tasks import hooks
from cl_tasks.app import app
from cl_tasks.intake import INTAKE_HEADER, Intake
from cl_tasks.jobs import job_store
from cl_tasks.modules import ModuleError, venv_python
from cl_tasks.presence import Announcer
from cl_tasks.settings import SettingsError, check_topic_level, current
from cl_tasks.tasks import compute_modules, is_compute, register, start_runners
from transports.wakeup import interrupt

logger = logging.getLogger(__name__)

_intake: Intake | None = None


@signals.before_task_publish.connect
def create_job_row(
    sender: str | None = None, headers: Any = None, body: Any = None, properties: Any = None, **_: Any
) -> None:
    """``.delay``/``send_task``/``submit_job`` of a compute task creates its ``jobs`` row."""
    if not sender or not is_compute(sender) or not headers or headers.get(INTAKE_HEADER):
        return
    kwargs = body[1] if isinstance(body, (list, tuple)) and len(body) > 1 else {}
    priority = (properties or {}).get("priority")
    job_store().create(headers["id"], sender, dict(kwargs or {}), priority=priority)


@signals.after_task_publish.connect
def mark_published(sender: str | None = None, headers: Any = None, **_: Any) -> None:
    """A client's compute message is in the broker (intake marks its batches itself)."""
    if sender and headers and is_compute(sender) and not headers.get(INTAKE_HEADER):
        job_store().mark_published([headers["id"]])


@signals.worker_init.connect
def register_discovered_tasks(**_: Any) -> None:
    """Every discovered task type becomes a task before the worker consumes."""
    for task_type in compute_modules():
        register(task_type)


@signals.celeryd_after_setup.connect
def prepare_modules(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Build the venvs of the modules this worker consumes; skip the ones that fail.

    A skipped module's queues are not consumed here, so its jobs wait (queued)
    for a worker that can run them.
    """
    if instance is None:
        return
    queues = instance.app.amqp.queues
    consumed = set(queues.consume_from or queues)
    settings = current()
    failures: dict[str, str | None] = {}
    for task_type, module in sorted(compute_modules().items()):
        if task_type not in consumed:
            continue
        if module.name not in failures:
            try:
                venv_python(settings.venv_dir, module)
                failures[module.name] = None
            except ModuleError as exc:
                failures[module.name] = str(exc)
                logger.error("%s; module %s skipped", exc, module.name)
        if failures[module.name] is not None:
            logger.error("task type %s (module %s) is not consumed by this worker", task_type, module.name)
            queues.deselect(task_type)


@signals.worker_process_init.connect
def warm_runners(**_: Any) -> None:
    """A new pool process starts the runners of the task types its worker consumes."""
    queues = app.amqp.queues
    start_runners(queues.consume_from or queues)


@signals.celeryd_after_setup.connect
def check_worker_id(sender: str | None = None, **_: Any) -> None:
    """The worker id is one MQTT topic level; refuse to start otherwise (naming the variable)."""
    if current().worker_id is None and current().mqtt.enabled and sender:
        try:
            check_topic_level(sender, "the worker node name (-n/--hostname; or set WORKER_ID)")
        except SettingsError as exc:
            logger.critical("%s", exc)
            raise SystemExit(1) from exc


class _Worker:
    """What the background threads need to know of the running worker's consumer."""

    consumer: Any = None

    def task_types(self) -> tuple[str, ...]:
        task_consumer = getattr(self.consumer, "task_consumer", None)
        queues = {queue.name for queue in task_consumer.queues} if task_consumer else set()
        return tuple(sorted(queues & set(compute_modules())))

    def idle_count(self) -> int:
        pool = getattr(self.consumer, "pool", None)
        concurrency = getattr(pool, "num_processes", None) or getattr(pool, "limit", None) or 1
        return int(concurrency) - len(worker_state.active_requests)


_worker = _Worker()
_announcer: Announcer | None = None


@signals.worker_ready.connect
def start_background(sender: Any = None, **_: Any) -> None:
    """Intake and capability announcements start once (worker_ready repeats on reconnect)."""
    global _intake, _announcer  # noqa: PLW0603 - one of each per worker
    _worker.consumer = sender
    settings = current()
    if _intake is None:
        _intake = Intake(app, job_store(), settings, _worker.task_types)
        _intake.start()
        logger.info("intake started for %s", list(_worker.task_types()))
    if _announcer is None and settings.mqtt.enabled:
        worker_id = settings.worker_id or sender.hostname
        _announcer = Announcer(settings.mqtt, worker_id, _worker.task_types, _worker.idle_count)
        _announcer.start()


@signals.worker_shutting_down.connect
def stop_intake(**_: Any) -> None:
    """Stop intake and wake the consumer now, so shutdown does not wait out a drain timeout."""
    if _intake is not None:
        _intake.stop()
    interrupt()


@signals.worker_shutdown.connect
def clear_capabilities(**_: Any) -> None:
    """A clean shutdown clears the retained capability message."""
    if _announcer is not None:
        _announcer.stop()


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
    _fail(request.task, request.id, reason)


def _fail(task_type: str, job_id: str, message: str) -> None:
    if job_store().fail(job_id, message):
        hooks.job_failed.send(sender=task_type, job_id=job_id, message=message)


@signals.task_failure.connect
def fail_job_on_failure(
    sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
) -> None:
    """Failures the task could not record itself (hard time limit, lost worker process)."""
    if sender is None or task_id is None or not is_compute(getattr(sender, "name", "")):
        return
    _fail(sender.name, task_id, f"{type(exception).__name__}: {exception}")
