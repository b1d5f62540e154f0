"""Celery events of cl_tasks: not built while no queue would receive them, sent once one is bound."""

from __future__ import annotations

from typing import Any

from kombu import Connection, Exchange, Queue

from cl_tasks import app


def test_events_go_only_where_a_queue_is_bound(sqlite_url: str) -> None:
    with Connection(sqlite_url) as conn:
        dispatcher = app.events.Dispatcher(conn, hostname="probe@test")
        published: list[str] = []
        real_publish = dispatcher.producer.publish

        def counting_publish(body: Any, **kwargs: Any) -> Any:
            published.append(kwargs["routing_key"])
            return real_publish(body, **kwargs)

        dispatcher.producer.publish = counting_publish
        # Given no monitor: a task event is neither serialized nor written
        dispatcher.send("task-succeeded", uuid="t1")
        assert published == []
        # When a monitor binds its queue (as Flower does), the next event reaches it
        monitor = Queue("monitor", Exchange("celeryev", "topic"), "task.#", channel=conn.channel())
        monitor.declare()
        dispatcher.send("task-succeeded", uuid="t2")
        assert published == ["task.succeeded"]
        message = monitor.get(no_ack=True)
        assert message is not None
        assert message.payload["uuid"] == "t2"
        dispatcher.close()
