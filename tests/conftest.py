"""Shared fixtures: real SQLite files, the machine's RabbitMQ, worker subprocesses."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kombu import Connection

import transports  # noqa: F401 - registers sqlite://

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh media_store.db in a temporary folder."""
    return f"sqlite:///{tmp_path / 'media_store.db'}"


@pytest.fixture(params=["sqlite", "amqp"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The contract suite runs, unchanged, on our transport and on RabbitMQ."""
    if request.param == "amqp":
        # Fail (not skip) when the server is missing: CI starts it.
        assert port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672"
        return RABBITMQ_URL
    return f"sqlite:///{tmp_path / 'media_store.db'}?polling_interval=0.05"


@pytest.fixture
def connect(broker_url: str) -> Iterator[Callable[[], Connection]]:
    """A factory of connections to ``broker_url``, all closed at the end."""
    opened: list[Connection] = []

    def factory() -> Connection:
        conn = Connection(broker_url)
        conn.connect()
        opened.append(conn)
        return conn

    yield factory
    for conn in opened:
        conn.release()


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Entity names unique to this test (the RabbitMQ server is shared)."""
    tag = uuid.uuid4().hex[:8]
    return lambda name: f"test-{name}-{tag}"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child Python processes that import this repository."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


PYTHON = sys.executable
