"""Shared fixtures: real SQLite files, the machine's RabbitMQ, worker subprocesses."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

import transports  # noqa: F401 - registers sqlite://

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")

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

#: Where a test's jobs table lives: the SQLite file, or a PostgreSQL URL.
Database = Path | str


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


# -- compute jobs --------------------------------------------------------------

TEST_MODULES = ROOT / "tests" / "compute_modules"
#: Venvs of compute modules, kept between runs so Pillow is installed once per machine.
TEST_VENVS = ROOT / ".venvs-test"

API_SCHEMA = (
    # What the cl_server API service creates: jobs (with an extra column) among other tables.
    """CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE NOT NULL,
       task_type TEXT NOT NULL, params TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL,
       progress INTEGER NOT NULL DEFAULT 0, created_at BIGINT, started_at BIGINT,
       completed_at BIGINT, task_output TEXT, error_message TEXT, retry_count INTEGER DEFAULT 0,
       max_retries INTEGER DEFAULT 3, created_by TEXT, priority INTEGER DEFAULT 5)""",
    "CREATE TABLE entities (id INTEGER PRIMARY KEY, label TEXT, file_path TEXT)",
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
    "INSERT INTO entities (label, file_path) VALUES ('cat', 'cat.jpg')",
    "INSERT INTO users (name) VALUES ('admin')",
)


def make_api_database(path: Path) -> None:
    """A media_store.db made the way the API service makes it (WAL, its own tables)."""
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in API_SCHEMA:
            conn.execute(statement)
    conn.close()


def make_api_postgresql_database(name: str) -> str:
    """A fresh PostgreSQL database ``name`` with the API's tables; returns its URL."""
    import psycopg

    assert port_open("127.0.0.1", 5432), "PostgreSQL is not running on 127.0.0.1:5432"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in API_SCHEMA:
            # SQLite's rowid keys are PostgreSQL's serial ones.
            conn.execute(
                statement.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "SERIAL PRIMARY KEY").replace(
                    "INTEGER PRIMARY KEY", "SERIAL PRIMARY KEY"
                )
            )
    return url


def drop_postgresql_database(name: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query(database: Database, sql: str, params: dict[str, object] | None = None) -> list[dict[str, object]]:
    """Run one statement (``:name`` parameters) in its own transaction; rows as dicts."""
    from sqlalchemy import text

    with _engine(database).begin() as conn:
        result = conn.execute(text(sql), params or {})
        return [dict(row._mapping) for row in result] if result.returns_rows else []


@functools.cache
def _engine(database: Database) -> Any:
    """One engine per database, without a pool: nothing stays open between statements."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    url = f"sqlite:///{database}" if isinstance(database, Path) else database
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    return create_engine(
        url, poolclass=NullPool, connect_args={"timeout": 60} if isinstance(database, Path) else {}
    )


def insert_job(database: Database, job_id: str, task_type: str, params: object, **columns: object) -> None:
    """INSERT a queued job row with plain SQL, as the API service does."""
    import json
    import time

    text = params if isinstance(params, str) else json.dumps(params)
    values = {
        "job_id": job_id,
        "task_type": task_type,
        "params": text,
        "status": "queued",
        "created_at": int(time.time() * 1000),
        **columns,
    }
    query(
        database,
        f"INSERT INTO jobs ({', '.join(values)}) VALUES ({', '.join(':' + name for name in values)})",
        values,
    )


def job_row(database: Database, job_id: str) -> dict[str, object]:
    rows = query(database, "SELECT * FROM jobs WHERE job_id = :job_id", {"job_id": job_id})
    return rows[0] if rows else {}


def messages_left(broker: str, queue: str) -> int:
    """Messages of ``queue`` still in the broker: on SQLite every row, taken or not;
    elsewhere the ready ones (stop the workers first, so nothing is held unacked)."""
    path = sqlite_broker_path(broker)
    if path is not None:
        rows = query(path, "SELECT count(*) AS n FROM kombu_message WHERE queue = :queue", {"queue": queue})
        return int(rows[0]["n"])  # type: ignore[call-overload]
    with Connection(broker) as conn:
        channel = conn.default_channel
        if hasattr(channel, "_size"):  # kombu's virtual transports (Redis): an empty queue has no key
            return int(channel._size(queue))
        return int(channel.queue_declare(queue, passive=True).message_count)


def sqlite_broker_path(broker: str) -> Path | None:
    return Path(broker.removeprefix("sqlite://").split("?", 1)[0]) if broker.startswith("sqlite://") else None


def wait_for_job(database: Database, job_id: str, timeout: float = 120.0) -> dict[str, object]:
    """Poll the row until it ends (completed or error)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = job_row(database, job_id)
        if row.get("status") in ("completed", "error"):
            return row
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end within {timeout}s: {job_row(database, job_id)}")


class Worker:
    """A ``celery -A cl_tasks worker`` subprocess in its own process group."""

    def __init__(self, env: dict[str, str], log: Path, *args: str, prefix: tuple[str, ...] = ()) -> None:
        import subprocess

        self.log = log
        self.process = subprocess.Popen(
            [
                *prefix,
                PYTHON,
                "-m",
                "celery",
                "-A",
                "cl_tasks",
                "worker",
                "-l",
                "info",
                "--logfile",
                str(log),
                "--without-mingle",
                "--without-gossip",
                *args,
            ],
            env=env,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while "ready." not in self.text():
            assert self.process.poll() is None, f"worker exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"worker not ready in {timeout}s:\n{self.text()}"
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes, as a crash would."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        import signal
        import subprocess

        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


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
    import subprocess

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
        import redis

        assert port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379"
        url = f"{REDIS_URL}/{1 + uuid.uuid4().int % 15}"
        redis.Redis.from_url(url).flushdb()
        yield url
        redis.Redis.from_url(url).flushdb()


@pytest.fixture
def jobs_env(server_dir: Path, database: Database, broker: str) -> dict[str, str]:
    """Environment of workers and clients on ``server_dir``, ``database`` and ``broker``."""
    env = subprocess_env(
        CL_SERVER_DIR=str(server_dir),
        COMPUTE_MODULES_DIR=str(TEST_MODULES),
        COMPUTE_VENV_DIR=str(TEST_VENVS),
        CELERY_BROKER_URL=broker,
        JOB_LEASE_SECONDS="3",
        BROKER_VISIBILITY_TIMEOUT="4",
        WORKER_POLL_INTERVAL="1",
    )
    if isinstance(database, str):
        env["DATABASE_URL"] = database
    return env


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
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


def run_client(env: dict[str, str], script: str, timeout: float = 180) -> str:
    """Run ``script`` in a fresh Python (a Celery client with this env); returns stdout."""
    import subprocess

    result = subprocess.run([PYTHON, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


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
