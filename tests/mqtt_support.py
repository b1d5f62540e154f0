"""Real MQTT for the tests: a subscriber, private Mosquitto brokers, a test CA."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import port_open, wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    wait_until(lambda: port_open("127.0.0.1", port), timeout, f"something listens on port {port}")


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """Collects every message on ``topic`` (a real paho client), from the moment it is subscribed."""

    def __init__(
        self,
        topic: str,
        port: int = 1883,
        *,
        host: str = "127.0.0.1",
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        #: A topic of this subscriber's own, for :meth:`settle`.
        self._probe_topic = f"cltest-probe/{uuid.uuid4().hex}"
        self._probes: set[bytes] = set()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2)
        if username:
            self._client.username_pw_set(username, password)
        if ca_file:
            self._client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe([(topic, 1), (self._probe_topic, 1)])
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.connect(host, port)
        self._client.loop_start()
        assert self._subscribed.wait(10), "subscriber could not connect and subscribe"

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            if message.topic == self._probe_topic:
                self._probes.add(bytes(message.payload))
                return
            self.messages.append(
                Received(message.topic, bytes(message.payload), bool(message.retain), time.monotonic())
            )

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [message for message in self.messages if message.topic == topic]

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def wait_for(
        self, predicate: Callable[[list[Received]], object], timeout: float = 30.0
    ) -> list[Received]:
        """Wait until ``predicate(messages)`` is true; returns the messages."""

        def met() -> tuple[list[Received]] | None:
            snapshot = self.snapshot()
            return (snapshot,) if predicate(snapshot) else None

        return wait_until(
            met, timeout, lambda: f"condition on {[(m.topic, m.payload) for m in self.snapshot()]}"
        )[0]

    def settle(self, timeout: float = 10.0) -> list[Received]:
        """Wait until every message the broker sent before now has arrived (the retained ones
        of the subscription among them); returns the messages.

        A message published now on this subscriber's own probe topic comes back after
        them: the broker delivers one client's messages in order.
        """
        marker = uuid.uuid4().bytes
        self._client.publish(self._probe_topic, marker, qos=1)
        wait_until(lambda: marker in self._probes, timeout, "the probe message came back")
        return self.snapshot()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class PrivateMosquitto:
    """A Mosquitto of the test's own, on a free port, that the test may stop and start."""

    def __init__(
        self, folder: Path, *, password_file: Path | None = None, tls: tuple[Path, Path, Path] | None = None
    ) -> None:
        self.port = free_port()
        self.folder = folder
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if password_file else 'true'}",
            "persistence false",
            f"log_dest file {folder / 'mosquitto.log'}",
            "log_type all",
            # Stay root when run as root: the test folders are owner-only.
            "user root",
        ]
        if password_file:
            lines.append(f"password_file {password_file}")
        if tls:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)])
        wait_port(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def make_password_file(folder: Path, user: str, password: str) -> Path:
    path = folder / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), user, password], check=True)
    path.chmod(0o644)
    return path


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for localhost / 127.0.0.1 (openssl)."""
    ca_key, ca, key, csr, cert = (
        folder / name for name in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=cl_tasks test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=localhost",
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    key.chmod(0o644)
    return ca, cert, key
