"""Which task types exist, which are compute jobs, and which this worker can serve.

The one answer to "is this task type a compute job?", asked by the client's
submit path, by intake, by the router and by the job-ending handlers. A compute
task type is one a compute module declares (discovered once per process under
``COMPUTE_MODULES_DIR``, narrowed to ``WORKER_SUPPORTED_TASKS``) or one of the
bundled :data:`BUNDLED_TASK_TYPES`, which clients may submit even where the
module folder is not installed.

At worker setup (``celeryd_after_setup``) the venvs of the modules the worker
consumes are built; a module whose venv cannot be built is logged and its
queues are not consumed, so its jobs wait (``queued``) for a worker that can
run them; so is a bundled task type's queue named with ``-Q`` where its module
is not installed or not in ``WORKER_SUPPORTED_TASKS``.

Imports only settings and module discovery: everything above it may ask it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from cl_tasks.modules import Module, ModuleError, discover, venv_python
from cl_tasks.settings import current
from transports.process import PerProcess

logger = logging.getLogger(__name__)

#: Task types of the bundled ``image_tools`` module (see DESIGN: the cl_server compute API).
BUNDLED_TASK_TYPES = ("image_resize", "image_conversion")

_modules: PerProcess[dict[str, Module]] = PerProcess(
    lambda: discover(current().modules_dir, current().supported_tasks)
)


def compute_modules() -> dict[str, Module]:
    """Task type -> module, discovered once per process."""
    return _modules.get()


def is_compute(name: str) -> bool:
    """Whether ``name`` is a compute task type (its jobs have a ``jobs`` row)."""
    return name in BUNDLED_TASK_TYPES or name in compute_modules()


def consumed_task_types(consumer: Any) -> tuple[str, ...]:
    """The compute task types whose queues Celery's ``consumer`` consumes now."""
    task_consumer = getattr(consumer, "task_consumer", None)
    queues = {queue.name for queue in task_consumer.queues} if task_consumer else set()
    return tuple(sorted(queues & set(compute_modules())))


@signals.celeryd_after_setup.connect
def prepare_modules(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Build the venvs of the modules this worker consumes; skip the ones that fail."""
    if instance is None:
        return
    queues = instance.app.amqp.queues
    consumed = set(queues.consume_from or queues)
    venv_dir = current().venv_dir
    for task_type in sorted(consumed.intersection(BUNDLED_TASK_TYPES) - set(compute_modules())):
        # Consumed without a module, its messages would be refused (dead letters) here.
        logger.error(
            "task type %s: no compute module under %s serves it here (WORKER_SUPPORTED_TASKS?);"
            " its queue is not consumed by this worker, its jobs wait for a worker that has it",
            task_type,
            current().modules_dir,
        )
        queues.deselect(task_type)
    failures: dict[str, str | None] = {}
    for task_type, module in sorted(compute_modules().items()):
        if task_type not in consumed:
            continue
        if module.name not in failures:
            try:
                venv_python(venv_dir, module)
                failures[module.name] = None
            except ModuleError as exc:
                failures[module.name] = str(exc)
                logger.error("%s; module %s skipped", exc, module.name)
        if failures[module.name] is not None:
            logger.error("task type %s (module %s) is not consumed by this worker", task_type, module.name)
            queues.deselect(task_type)
