"""Teach Flower about the SQLite broker and about job progress.

Flower knows queue depths only for RabbitMQ and Redis, and Celery's event state
has no ``PROGRESS`` state. :func:`install` (called by ``cl_tasks.app`` when Flower
is already loaded, as it is under ``celery -A cl_tasks flower``) adds:

* a broker class for ``sqlite://`` URLs, so the broker page and
  ``/api/queues/length`` show our queue depths (read through kombu, like any
  client);
* a ``progress`` field on tasks (set by our ``task-progress`` events, which
  Celery's event state already turns into the custom state ``PROGRESS``), so the
  task list and ``/api/tasks`` show running jobs' progress.
"""

from __future__ import annotations

import sys
from typing import Any

from celery.events import state
from kombu.connection import Connection

from cl_tasks.queues import queue_depths

_installed = False


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
    import flower.utils.broker as flower_broker  # noqa: PLC0415 - optional: the ``flower`` extra
    import flower.views as flower_views  # noqa: PLC0415 - optional: the ``flower`` extra

    original = flower_broker.Broker

    class Broker(original):  # type: ignore[misc, valid-type]
        def __new__(cls, broker_url: str, *args: Any, **kwargs: Any) -> Any:
            if broker_url.startswith("sqlite:"):
                return SQLiteQueues(broker_url, *args, **kwargs)
            return original.__new__(cls, broker_url, *args, **kwargs)

    flower_broker.Broker = Broker
    flower_views.Broker = Broker
    # A "task-progress" event already sets the custom state PROGRESS and the
    # task's ``progress`` attribute; listing the field makes Flower show it.
    state.Task.progress = None
    if "progress" not in state.Task._fields:
        state.Task._fields = (*state.Task._fields, "progress")
    _installed = True
