"""Teach Flower about the SQLite broker and about job progress.

Flower knows queue depths only for RabbitMQ and Redis, and Celery's event state
has no ``PROGRESS`` state. :func:`install` (called by ``cl_tasks.app`` when Flower
is already loaded, as it is under ``celery -A cl_tasks flower``) adds:

* a broker class for ``sqlite://`` URLs, so the broker page and
  ``/api/queues/length`` show our queue depths (read through kombu, like any
  client);
* :class:`JobTask`, the task of Flower's event state: a running job is
  ``STARTED`` with its ``progress`` (Celery's event state would turn our
  ``task-progress`` events into a custom state ``PROGRESS``, which Flower's
  Started filter misses and whose page has no Terminate button), and a
  finished one shows 100 (succeeded) or no progress (failed, revoked);
* the Result column in Flower's task list by default, where a running job's
  progress shows (``progress 40%``) beside its state.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import states
from celery.events import state as event_state
from kombu.connection import Connection

from cl_tasks.queues import queue_depths

_installed = False
#: Flower's task list columns: its default plus ``result`` (where a running job's progress shows).
TASKS_COLUMNS = "name,uuid,state,result,received,runtime,worker"

#: States after which a task's progress events are late news (they change nothing).
_OVER = frozenset({*states.READY_STATES, states.REJECTED})


class JobTask(event_state.Task):
    """A task in Flower's event state; a ``task-progress`` event keeps it ``STARTED``.

    The progress shows as the task's ``progress`` field (task page, ``/api/tasks``)
    and, while it runs, as its ``result`` (``progress 40%``: the STARTED state's
    info, beside the state in the task list). A progress event that comes before
    ``task-started`` (they come from different processes) makes it STARTED; one
    that comes after its end changes nothing.
    """

    state: str | None
    result: Any
    progress: float | None = None
    _fields = (*event_state.Task._fields, "progress")

    def event(
        self,
        type_: str,
        timestamp: float | None = None,
        local_received: float | None = None,
        fields: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if type_ == "progress":
            self._progressed((fields or {}).get("progress"))
            return
        super().event(type_, timestamp, local_received, fields, **kwargs)
        if self.progress is not None and self.state in _OVER:
            self._ended()

    def _progressed(self, value: Any) -> None:
        if not isinstance(value, int | float) or self.state in _OVER:
            return
        self.progress = float(value)
        self.result = f"progress {value:g}%"
        self.state = states.STARTED

    def _ended(self) -> None:
        if self.state == states.SUCCESS:
            self.progress = 100.0
            return
        self.progress = None
        if isinstance(self.result, str) and self.result.startswith("progress "):
            self.result = None


class SQLiteQueues:
    """Flower broker client for the SQLite transport: queue depths by name."""

    def __init__(self, broker_url: str, *_: Any, **options: Any) -> None:
        self.broker_url = broker_url
        self.options = options.get("broker_options") or {}

    async def queues(self, names: list[str]) -> list[dict[str, Any]]:
        with Connection(self.broker_url, transport_options=self.options) as conn:
            return [{"name": name, "messages": depth} for name, depth in queue_depths(conn, names).items()]


def install() -> None:
    """Patch the loaded Flower (idempotent); a no-op when Flower is not loaded."""
    global _installed  # noqa: PLW0603 - patch once per process
    if _installed or "flower.utils.broker" not in sys.modules:
        return
    import flower.events as flower_events  # noqa: PLC0415 - optional: the ``flower`` extra
    import flower.options  # noqa: F401, PLC0415 - optional; defines tasks_columns
    import flower.utils.broker as flower_broker  # noqa: PLC0415 - optional: the ``flower`` extra
    import flower.views as flower_views  # noqa: PLC0415 - optional: the ``flower`` extra
    from tornado.options import options  # noqa: PLC0415 - optional: Flower's dependency

    original = flower_broker.Broker

    class Broker(original):  # type: ignore[misc, valid-type]
        def __new__(cls, broker_url: str, *args: Any, **kwargs: Any) -> Any:
            if broker_url.startswith("sqlite:"):
                return SQLiteQueues(broker_url, *args, **kwargs)
            return original.__new__(cls, broker_url, *args, **kwargs)

    flower_broker.Broker = Broker
    flower_views.Broker = Broker
    flower_events.EventsState.Task = JobTask
    # A new default (FLOWER_TASKS_COLUMNS, flowerconfig.py and --tasks_columns still win,
    # being read after the app is loaded): the Result column, so a running job's progress
    # stands beside its STARTED state in the task list.
    options.tasks_columns = TASKS_COLUMNS
    _installed = True
