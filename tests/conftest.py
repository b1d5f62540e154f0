"""Shared fixtures: real SQLite files, the machine's RabbitMQ, worker subprocesses.

The plain helpers live in ``tests/support.py``; the names tests import from here
(``Worker``, ``insert_job``, ``job_row``, ``query``, ``run_client``, ``wait_for_job``, ...)
are re-exported from it.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection

from tests.support import (
    PYTHON,
    RABBITMQ_URL,
    REDIS_URL,
    ROOT,
    TEST_MODULES,
    TEST_VENVS,
    Database,
    StartWorker,
    Worker,
    compute_env,
    drop_postgresql_database,
    insert_job,
    job_row,
    make_api_database,
    make_api_postgresql_database,
    messages_left,
    port_open,
    query,
    run_client,
    subprocess_env,
    wait_for_job,
)

__all__ = [
    "PYTHON",
    "ROOT",
    "STACK",
    "TEST_MODULES",
    "TEST_VENVS",
    "TRANSPORT_NAME",
    "Database",
    "StartWorker",
    "Worker",
    "insert_job",
    "job_row",
    "make_api_database",
    "messages_left",
    "port_open",
    "query",
    "run_client",
    "subprocess_env",
    "wait_for_job",
]

#: Which broker and jobs database the tests marked ``stack`` run on. The default is the
#: embedded one (SQLite ``media_store.db`` as broker and jobs table); the others are the
#: "beyond one machine" configurations, reached by setting CELERY_BROKER_URL and
#: DATABASE_URL only. ``scripts/test.sh`` runs the marked tests once per stack.
STACKS = ("sqlite", "rabbitmq+postgresql", "redis+postgresql")
STACK = os.environ.get("CL_TASKS_TEST_STACK", "sqlite")
if STACK not in STACKS:
    raise SystemExit(f"CL_TASKS_TEST_STACK={STACK!r} is not one of {', '.join(STACKS)}")
#: The name ``celery inspect stats`` reports for the stack's broker transport.
TRANSPORT_NAME = {"sqlite": "sqlite", "rabbitmq+postgresql": "amqp", "redis+postgresql": "redis"}[STACK]


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


# -- compute jobs --------------------------------------------------------------


@pytest.fixture
def server_dir(tmp_path: Path) -> Path:
    """CL_SERVER_DIR; on the sqlite stack with a media_store.db made by the "API service"."""
    folder = tmp_path / "data"
    folder.mkdir()
    if STACK == "sqlite":
        make_api_database(folder / "media_store.db")
    return folder


@pytest.fixture
def database(server_dir: Path) -> Iterator[Database]:
    """The jobs database of this test: ``media_store.db``, or a fresh PostgreSQL database."""
    if STACK == "sqlite":
        yield server_dir / "media_store.db"
        return
    name = f"cltest_{uuid.uuid4().hex[:12]}"
    yield make_api_postgresql_database(name)
    drop_postgresql_database(name)


@pytest.fixture
def broker(server_dir: Path) -> Iterator[str]:
    """CELERY_BROKER_URL of this test: the SQLite file, or a private RabbitMQ vhost / Redis db."""
    if STACK == "sqlite":
        yield f"sqlite:///{server_dir / 'media_store.db'}?visibility_timeout=4&polling_interval=0.5"
    elif STACK.startswith("rabbitmq"):
        assert port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672"
        vhost = f"cltest-{uuid.uuid4().hex[:12]}"
        ctl = ["rabbitmqctl", "-q"]
        subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
        subprocess.run(
            [*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield RABBITMQ_URL.rstrip("/") + f"/{vhost}"
        subprocess.run([*ctl, "delete_vhost", vhost], capture_output=True, timeout=60)
    else:
        assert port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379"
        url = f"{REDIS_URL}/{1 + uuid.uuid4().int % 15}"
        redis.Redis.from_url(url).flushdb()
        yield url
        redis.Redis.from_url(url).flushdb()


@pytest.fixture
def jobs_env(server_dir: Path, database: Database, broker: str) -> dict[str, str]:
    """Environment of workers and clients on ``server_dir``, ``database`` and ``broker``."""
    env = compute_env(
        server_dir,
        CELERY_BROKER_URL=broker,
        JOB_LEASE_SECONDS="3",
        BROKER_VISIBILITY_TIMEOUT="4",
    )
    if isinstance(database, str):
        env["DATABASE_URL"] = database
    return env


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """Factory of worker subprocesses, all stopped at the end of the test."""
    started: list[Worker] = []

    def start(env: dict[str, str], *args: str, name: str = "w1", ready: bool = True) -> Worker:
        worker = Worker(env, tmp_path / f"{name}.log", "-n", f"{name}@%h", *args)
        started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


# -- a worker that is not root ------------------------------------------------------

#: The unprivileged user tests run workers as (created by the fixture when missing).
UNPRIVILEGED_USER = "cl-tasks-test"


@pytest.fixture(scope="session")
def unprivileged_user() -> tuple[int, int]:
    """(uid, gid) of :data:`UNPRIVILEGED_USER`; the tests run as root (CI does) to make it."""
    import pwd
    import subprocess

    assert os.geteuid() == 0, "tests of a non-root worker run as root (they create the user)"
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        command = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        subprocess.run([*command, UNPRIVILEGED_USER], check=True, capture_output=True, timeout=60)
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    return entry.pw_uid, entry.pw_gid


def as_user(uid: int, gid: int) -> tuple[str, ...]:
    """The command prefix that runs a program as ``uid``/``gid`` (see tests/run_as.py)."""
    helper = str(ROOT / "tests" / "run_as.py")
    return ("unshare", "--mount", "--propagation", "private", PYTHON, helper, str(uid), str(gid), "--")
