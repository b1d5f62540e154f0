"""Celery events nobody would receive are not built or sent (SQLite broker).

Task and worker events go to Celery's ``celeryev`` exchange. While no monitor
(Flower, ``celery events``) has a queue bound there that the event's routing key
matches (gossip's queue takes only ``worker.#``), the broker drops them anyway.
On the SQLite transport one indexed read answers that
(:meth:`transports.sqlite.Channel.routes`), so the dispatcher skips serializing
and publishing such an event; the moment a monitor binds its queue, events
flow to it. On other brokers every event is published, as Celery does.
"""

from __future__ import annotations

from typing import Any

from celery.app.events import Events as CeleryEvents
from celery.events.dispatcher import EventDispatcher as CeleryEventDispatcher


class EventDispatcher(CeleryEventDispatcher):  # type: ignore[misc]
    """Celery's dispatcher, minus the events no bound queue would receive."""

    def _publish(self, event: Any, producer: Any, routing_key: str, **kwargs: Any) -> Any:
        # The producer may be a task's (the task-sent event): the exchange is ours.
        routes = None if producer is None else getattr(producer.channel, "routes", None)
        if routes is not None and not routes(self.exchange.name, routing_key):
            return None
        return super()._publish(event, producer, routing_key, **kwargs)


class Events(CeleryEvents):  # type: ignore[misc]
    """``app.events`` of cl_tasks: makes :class:`EventDispatcher` its dispatchers."""

    dispatcher_cls = "cl_tasks.events:EventDispatcher"
