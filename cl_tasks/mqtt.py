"""MQTT for cl_tasks: the only module that imports paho-mqtt (2.x, callback API v2).

Messages are frozen dataclasses built here; :class:`Publisher` is one paho client
per process, made lazily (so after a fork). It connects in the background and
reconnects with backoff, so a missing or restarting broker never fails or delays
the caller: :meth:`Publisher.publish` only queues. A Last Will, when given, is set
before the first connect and kept for every reconnect; ``on_connect`` runs after
every (re)connect so the caller can announce its state again. Credentials are
never logged.

An outage is logged once, not once per retry: the first failed attempt (broker
unreachable, or refusing us) or the lost connection is one WARNING naming
``host:port``, and the connection that ends it one INFO line; the attempts in
between are counted (:attr:`Publisher.failed_attempts`), not logged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cl_tasks.settings import MqttSettings

logger = logging.getLogger(__name__)

#: Seconds of silence after which the broker drops us and publishes the will.
KEEPALIVE = 30
#: Messages kept while the broker is away; older events beyond this are dropped.
MAX_QUEUED = 1000
#: Seconds to wait for a last message (a clear) to reach the broker on shutdown.
FLUSH_TIMEOUT = 3.0


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class JobEvent:
    """A job's event on ``MQTT_TOPIC``: processing (with progress), completed or error.

    The payload carries the progress twice, for both kinds of client: nested as
    ``data.progress`` (a float; the seed README's form) and flat as ``progress`` (an
    int 0-100; what the upstream worker publishes and its Python SDK reads). An
    ``error`` event has no progress of its own: the flat one is then absent.
    """

    event_type: str
    job_id: str
    data: dict[str, Any]
    timestamp: int = field(default_factory=now_ms)

    def payload(self) -> bytes:
        message = asdict(self)
        progress = self.data.get("progress")
        if isinstance(progress, (int, float)):
            message["progress"] = int(progress)
        return json.dumps(message).encode()


@dataclass(frozen=True)
class Capabilities:
    """A worker's retained announcement on ``CAPABILITY_TOPIC_PREFIX/<worker id>``."""

    id: str
    capabilities: tuple[str, ...]
    idle_count: int
    timestamp: int = field(default_factory=now_ms)

    def payload(self) -> bytes:
        return json.dumps({**asdict(self), "capabilities": list(self.capabilities)}).encode()


def _new_client(settings: MqttSettings, client_id: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_queued_messages_set(MAX_QUEUED)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if settings.use_tls:
        client.tls_set(ca_certs=settings.ca_file)
    return client


class Publisher:
    """One background MQTT connection; publishing never blocks or raises."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        role: str,
        will_topic: str | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_connect = on_connect
        self._connected = threading.Event()
        self._closing = False
        #: Failed connection attempts since the start or the last connection.
        self.failed_attempts = 0
        self._outage_logged = False
        client_id = f"cl_tasks-{role}-{socket.gethostname()}-{os.getpid()}"
        self._client = _new_client(settings, client_id)
        if will_topic is not None:
            self._client.will_set(will_topic, payload=b"", qos=1, retain=True)
        self._client.on_connect = self._connected_cb
        self._client.on_connect_fail = self._connect_failed_cb
        self._client.on_disconnect = self._disconnected_cb
        self._client.connect_async(settings.host, settings.port, keepalive=KEEPALIVE)
        self._client.loop_start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def where(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    def _outage(self, message: str) -> None:
        """Log the start of an outage, once (see the module docstring)."""
        self.failed_attempts += 1
        if not self._outage_logged:
            self._outage_logged = True
            logger.warning("%s", message)

    def _connect_failed_cb(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the error is the one being handled.
        error = sys.exc_info()[1]
        reason = f" ({type(error).__name__}: {error})" if error is not None else ""
        self._outage(
            f"MQTT broker {self.where} unreachable{reason}; job events and capabilities are kept"
            f" (up to {MAX_QUEUED}) and sent when it answers; retrying in the background"
        )

    def _connected_cb(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            hint = " (check MQTT_USERNAME/MQTT_PASSWORD)" if self._settings.username else ""
            self._outage(
                f"MQTT broker {self.where} refused the connection: {reason}{hint}; retrying in the background"
            )
            return
        after = f" after {self.failed_attempts} failed attempt(s)" if self.failed_attempts else ""
        logger.info("MQTT connected to %s%s", self.where, after)
        self.failed_attempts = 0
        self._outage_logged = False
        self._connected.set()
        if self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:
                logger.exception("MQTT: announcing after connect failed")

    def _disconnected_cb(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._connected.is_set() and not self._closing:
            self._outage_logged = True
            logger.warning("MQTT connection to %s lost (%s); reconnecting", self.where, reason)
        self._connected.clear()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> paho.MQTTMessageInfo | None:
        """Queue ``payload`` for ``topic`` at QoS 1; logs instead of raising."""
        try:
            return self._client.publish(topic, payload, qos=1, retain=retain)
        except Exception:
            logger.exception("MQTT publish to %s failed", topic)
            return None

    def close(self, *, clear_topic: str | None = None) -> None:
        """Optionally clear a retained topic (waiting briefly), then disconnect."""
        if clear_topic is not None and self.connected:
            info = self.publish(clear_topic, b"", retain=True)
            if info is not None:
                try:
                    info.wait_for_publish(FLUSH_TIMEOUT)
                except (RuntimeError, ValueError):
                    logger.warning("MQTT: could not clear %s before disconnecting", clear_topic)
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()


def clear_retained(settings: MqttSettings, pattern: str, *, listen: float = 1.5) -> list[str]:
    """Clear every retained message under ``pattern``; returns the cleared topics (sorted).

    Subscribes, collects the retained messages the broker sends within
    ``listen`` seconds, and publishes an empty retained payload to each.
    """
    client = _new_client(settings, f"cl_tasks-cleanup-{os.getpid()}")
    found: set[str] = set()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.retain and message.payload:
            found.add(message.topic)

    client.on_message = on_message
    client.connect(settings.host, settings.port, keepalive=KEEPALIVE)
    client.subscribe(pattern, qos=1)
    client.loop_start()
    try:
        time.sleep(listen)
        infos = [client.publish(topic, b"", qos=1, retain=True) for topic in sorted(found)]
        for info in infos:
            info.wait_for_publish(FLUSH_TIMEOUT)
    finally:
        client.disconnect()
        client.loop_stop()
    return sorted(found)
