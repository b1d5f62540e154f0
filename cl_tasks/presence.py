"""MQTT mirroring of the worker's life: job events and retained capabilities.

* Job events (``MQTT_TOPIC``, QoS 1, not retained) come from the job hooks in
  whichever process runs the job, through that process's own client.
* Capabilities (``CAPABILITY_TOPIC_PREFIX/<worker id>``, QoS 1, retained) come
  from the worker's main process: when it is ready, on every change of
  ``idle_count`` (free pool slots: concurrency minus running tasks) or of the
  consumed task types, every ``MQTT_HEARTBEAT_INTERVAL`` seconds and after
  every reconnect. A clean shutdown clears the retained message; the Last Will
  (the same empty retained payload) clears it when the worker dies.
* ``BROADCAST_TYPE=noop``: nothing is published and no connection is made.

Every handler catches and logs: MQTT never fails or delays a task.

Signals of this concern: the worker id is checked at setup (one MQTT topic
level), the announcer starts when the worker is ready (once) and clears the
retained message at shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.worker import state as worker_state

from cl_tasks import hooks
from cl_tasks.catalog import consumed_task_types
from cl_tasks.lifecycle import WorkerService
from cl_tasks.mqtt import Capabilities, JobEvent, Publisher
from cl_tasks.settings import MqttSettings, SettingsError, check_topic_level, current
from transports.process import PerProcess

logger = logging.getLogger(__name__)

#: Seconds between looks at the pool for busy/idle changes.
WATCH_EVERY = 0.05


class _Client:
    """This process's MQTT client slot: made by the first caller (the worker's, with its Will)."""

    def __init__(self) -> None:
        self.publisher: Publisher | None = None
        self.lock = threading.Lock()


_client: PerProcess[_Client] = PerProcess(_Client)


def publisher(
    *, will_topic: str | None = None, on_connect: Callable[[], None] | None = None
) -> Publisher | None:
    """This process's MQTT client (None with ``BROADCAST_TYPE=noop``), made on first use."""
    settings = current().mqtt
    if not settings.enabled:
        return None
    slot = _client.get()
    with slot.lock:
        if slot.publisher is None:
            role = "worker" if will_topic else "jobs"
            slot.publisher = Publisher(settings, role=role, will_topic=will_topic, on_connect=on_connect)
        return slot.publisher


def _publish_event(event: JobEvent) -> None:
    try:
        client = publisher()
        if client is not None:
            client.publish(current().mqtt.events_topic, event.payload())
    except Exception:
        logger.exception("MQTT: publishing %s of job %s failed", event.event_type, event.job_id)


@hooks.job_progress.connect
def _on_progress(sender: Any = None, job_id: str = "", progress: float = 0.0, **_: Any) -> None:
    _publish_event(JobEvent("processing", job_id, {"progress": float(progress)}))


@hooks.job_completed.connect
def _on_completed(sender: Any = None, job_id: str = "", output: Any = None, **_: Any) -> None:
    _publish_event(JobEvent("completed", job_id, {"progress": 100.0, "task_output": output}))


@hooks.job_failed.connect
def _on_failed(sender: Any = None, job_id: str = "", message: str = "", **_: Any) -> None:
    _publish_event(JobEvent("error", job_id, {"error": message}))


class Announcer(threading.Thread):
    """Publishes this worker's capabilities while it runs (main process only)."""

    def __init__(
        self,
        settings: MqttSettings,
        worker_id: str,
        capabilities: Callable[[], tuple[str, ...]],
        idle_count: Callable[[], int],
    ) -> None:
        super().__init__(name="cl_tasks-capabilities", daemon=True)
        self.topic = f"{settings.capability_prefix}/{worker_id}"
        self._settings = settings
        self._worker_id = worker_id
        self._capabilities = capabilities
        self._idle_count = idle_count
        self._stopped = threading.Event()
        self._last: tuple[tuple[str, ...], int] | None = None
        # The client may connect (and call announce) before publisher() returns.
        self._client: Publisher | None = None
        self._client = publisher(will_topic=self.topic, on_connect=self.announce)

    def announce(self) -> None:
        """Publish the current capabilities now (retained)."""
        state = (self._capabilities(), max(0, self._idle_count()))
        self._last = state
        if self._client is not None and not self._stopped.is_set():
            message = Capabilities(self._worker_id, state[0], state[1])
            self._client.publish(self.topic, message.payload(), retain=True)

    def run(self) -> None:
        next_heartbeat = 0.0
        while not self._stopped.wait(WATCH_EVERY):
            try:
                state = (self._capabilities(), max(0, self._idle_count()))
                if state != self._last or time.monotonic() >= next_heartbeat:
                    self.announce()
                    next_heartbeat = time.monotonic() + self._settings.heartbeat_interval
            except Exception:
                logger.exception("MQTT: announcing capabilities failed")

    def stop(self) -> None:
        """Stop announcing, clear the retained message and disconnect."""
        self._stopped.set()
        if self._client is not None:
            self._client.close(clear_topic=self.topic)


def idle_count(consumer: Any) -> int:
    """Free pool slots of the worker whose consumer is ``consumer``."""
    pool = getattr(consumer, "pool", None)
    concurrency = getattr(pool, "num_processes", None) or getattr(pool, "limit", None) or 1
    return int(concurrency) - len(worker_state.active_requests)


@signals.celeryd_after_setup.connect
def check_worker_id(sender: str | None = None, **_: Any) -> None:
    """The worker id is one MQTT topic level; refuse to start otherwise (naming the variable)."""
    if current().worker_id is None and current().mqtt.enabled and sender:
        try:
            check_topic_level(sender, "the worker node name (-n/--hostname; or set WORKER_ID)")
        except SettingsError as exc:
            logger.critical("%s", exc)
            raise SystemExit(1) from exc


def _start_announcer(consumer: Any) -> Announcer | None:
    settings = current()
    if not settings.mqtt.enabled:
        return None
    worker_id = settings.worker_id or consumer.hostname
    announcer = Announcer(
        settings.mqtt, worker_id, lambda: consumed_task_types(consumer), lambda: idle_count(consumer)
    )
    announcer.start()
    return announcer


service = WorkerService(_start_announcer, Announcer.stop).connect(signals.worker_shutdown)
